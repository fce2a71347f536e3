"""The row type of the common optimizer suite and the byte formulas rows share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

FP32 = 4


def adam_bytes(numel: int) -> int:
    """exp_avg + exp_avg_sq in fp32, integer step (LowRankAdamW's unprojected groups)."""
    return 2 * numel * FP32


def torch_adamw_bytes(numel: int) -> int:
    """torch.optim.AdamW: two moments plus a float32 scalar step tensor."""
    return 2 * numel * FP32 + FP32


def galore_weight_bytes(m: int, n: int, rank: int) -> int:
    """std projection: moments r x max(m, n), basis min(m, n) x r."""
    return (2 * rank * max(m, n) + rank * min(m, n)) * FP32


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer configuration in the common suite (tests/test_optim.py).

    weight_bytes(m, n): exact optimizer-state bytes of one targeted fp32 m x n weight;
    other_bytes(numel): state bytes of one parameter of the other (AdamW) group;
    shared_bytes(shapes): buffers shared between weights, counted once.
    """

    name: str
    hparams: dict
    weight_bytes: Callable[[int, int], int]  # state of one targeted m x n weight
    other_bytes: Callable[[int], int] = adam_bytes  # state of one other parameter, by numel
    low_rank: bool = True  # state must be below AdamW's
    lr: float = 1e-2
    #: bytes of ``optimizer.shared_buffers`` given the projected weights' shapes (DCT bases)
    shared_bytes: Callable[[Sequence[tuple[int, int]]], int] = lambda shapes: 0
