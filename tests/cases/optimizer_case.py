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
    """One optimizer configuration in the common suite (tests/test_optim.py); every registered
    optimizer needs at least one row (the suite fails otherwise).

    weight_bytes(m, n): exact optimizer-state bytes of one method-trained fp32 m x n weight (a
    targeted Linear weight, or an adapted layer's out x in for optimizers of adapters);
    other_bytes(numel): state bytes of one parameter of the other (AdamW) group;
    shared_bytes(shapes): buffers shared between weights, counted once.
    adapter: the adapter method the model is adapted with first (rank 4, alpha 8), for
    optimizers that train adapters (LoRA-Pro); None for optimizers of the plain model.
    loss_ratio: the loss after 20 steps on one batch must be below this share of the first.
    accumulation_tolerance: for updates that are discontinuous in the gradient (quantisation
    bins, signs), the largest relative distance (in Frobenius norm, of the distance moved)
    allowed between accumulated micro-batches and one full batch, whose gradients differ by
    float summation order only; None = equal to float tolerance.
    """

    name: str
    hparams: dict
    weight_bytes: Callable[[int, int], int]  # state of one method-trained m x n weight
    other_bytes: Callable[[int], int] = adam_bytes  # state of one other parameter, by numel
    low_rank: bool = True  # state must be below AdamW's
    lr: float = 1e-2
    #: bytes of ``optimizer.shared_buffers`` given the projected weights' shapes (DCT bases)
    shared_bytes: Callable[[Sequence[tuple[int, int]]], int] = lambda shapes: 0
    adapter: str | None = None
    #: final / initial loss after 20 steps on one batch (only adapters train when ``adapter`` is set)
    loss_ratio: float = 0.5
    accumulation_tolerance: float | None = None

    @property
    def id(self) -> str:
        return f"{self.name}-{'-'.join(f'{k}={v}' for k, v in self.hparams.items())}"
