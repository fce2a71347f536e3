"""DyLoRA: one LoRA block trained for a whole range of ranks at once.

Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation", EACL 2023, arXiv 2210.07558.

With ``W_dw = A`` (``r x in``) and ``W_up = B`` (``out x r``), each training step samples a rank
``b ~ p_B`` (uniform on ``{min_rank, ..., r}``) and uses the truncated block (paper, Section 3;
the ``alpha / b`` scaling is the one the authors insist on)

    A_{<=b} = A[:b, :],   B_{<=b} = B[:, :b],   h = W0 x + (alpha / b) B_{<=b} A_{<=b} x

so every leading sub-block is trained to work on its own. Parameter update (the paper's rule,
default ``frozen=True``): only the ``b``-th row of ``A`` and the ``b``-th column of ``B`` receive
the gradient; the rows/columns below ``b`` act in the forward but are held fixed (their
gradient is zero). ``frozen=False`` is the non-frozen variant: all of ``A_{<=b}``, ``B_{<=b}``
are updated (on the tiny LLaMA it reaches lower losses at every truncated rank).

One ``b`` is used by all layers in a step: it is a deterministic function of ``(seed, step)``,
drawn at construction for step 0 and by ``after_step`` after each optimizer step (the training
loop must call ``rankwise.adapters.after_step``; without it ``b`` stays at its first draw).
In eval mode the layer uses ``eval_rank`` (default: the full rank ``r``), as the paper evaluates
any chosen rank without retraining. :func:`truncate` cuts a trained adapter to a rank
``r' <= r`` for good: the layer keeps ``A[:r']``, ``B[:, :r']`` and scaling ``alpha / r'``.

Init as LoRA: ``A`` kaiming-uniform, ``B = 0`` (the model equals the base model at init).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.api import adapter_layers
from rankwise.adapters.base import ADAPTERS, AdapterLayer
from rankwise.errors import RankwiseError


def sample_rank(seed: int, step: int, low: int, high: int) -> int:
    """``b ~ Uniform{low, ..., high}``, the same for every layer given ``(seed, step)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(low, high + 1, (1,), generator=generator))


@ADAPTERS.register(
    "dylora",
    family="dynamic_rank",
    paper="DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation",
    arxiv="2210.07558",
)
class DyLoraLayer(AdapterLayer):
    """LoRA block whose leading ``b x b`` sub-blocks are trained together (nested ranks)."""

    OPTIONS = {"min_rank": 1, "eval_rank": None, "frozen": True, "seed": 0}

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        for name, low in (("min_rank", 1), ("seed", 0)):
            value = self.options[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise self.error(f"{name} must be an integer >= {low}, got {value!r}")
        if self.options["min_rank"] > self.rank:
            raise self.error(f"min_rank {self.options['min_rank']} is above the rank {self.rank}; lower it")
        self.check_eval_rank(self.options["eval_rank"])
        if not isinstance(self.options["frozen"], bool):
            raise self.error(f"frozen must be True or False, got {self.options['frozen']!r}")
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))
        self.sampled_rank = self.draw_rank(0)
        self.merged_rank = self.rank

    def check_eval_rank(self, value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= self.rank):
            raise self.error(f"eval_rank must be None (full rank) or an integer in [1, {self.rank}], got {value!r}")

    def draw_rank(self, step: int) -> int:
        return sample_rank(int(self.options["seed"]), step, int(self.options["min_rank"]), self.rank)

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def current_rank(self) -> int:
        """The rank in use: the merged one, the sampled ``b`` in training, else ``eval_rank`` (or ``r``)."""
        if self.merged:
            return self.merged_rank
        if self.training:
            return self.sampled_rank
        return self.options["eval_rank"] or self.rank

    def truncated_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B[:, :rank], A[:rank])``; in frozen training only the last row/column carries a gradient."""
        up, down = self.lora_B[:, :rank], self.lora_A[:rank]
        if self.training and self.options["frozen"] and torch.is_grad_enabled():
            up = torch.cat([up[:, : rank - 1].detach(), up[:, rank - 1 :]], dim=1)
            down = torch.cat([down[: rank - 1].detach(), down[rank - 1 :]], dim=0)
        return up, down

    def delta_weight(self) -> torch.Tensor:
        rank = self.current_rank()
        up, down = self.truncated_factors(rank)
        return (self.alpha / rank) * (up @ down)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.current_rank()
        up, down = self.truncated_factors(rank)
        return (x.to(down.dtype) @ down.T) @ up.T * (self.alpha / rank)

    def merge(self) -> None:
        if not self.merged:
            self.merged_rank = self.current_rank()
        super().merge()

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in fp32 at the current rank, scaling folded into ``B``: ``B @ A == delta_weight()``."""
        with torch.no_grad():
            rank = self.current_rank()
            up = self.lora_B.float()[:, :rank] * (self.alpha / rank)
            return up.contiguous(), self.lora_A.float()[:rank].contiguous()

    @classmethod
    def after_step(cls, layers: dict[str, DyLoraLayer], *, step: int, total_steps: int, optimizer: Any = None) -> None:
        for layer in layers.values():
            layer.sampled_rank = layer.draw_rank(step)

    def truncate_(self, rank: int) -> None:
        """Keep only the first ``rank`` rows of ``A`` / columns of ``B`` (new Parameters); see :func:`truncate`."""
        with torch.no_grad():
            self.lora_A = nn.Parameter(self.lora_A[:rank].clone())
            self.lora_B = nn.Parameter(self.lora_B[:, :rank].clone())
        self.rank = rank
        self.options["min_rank"] = min(int(self.options["min_rank"]), rank)
        self.options["eval_rank"] = None
        self.sampled_rank = min(self.sampled_rank, rank)


def truncate(model: nn.Module, rank: int) -> nn.Module:
    """Cut every DyLoRA layer of ``model`` to ``rank`` (in place) and return ``model``.

    Each layer becomes the rank-``rank`` adapter ``(alpha / rank) B[:, :rank] A[:rank]`` -- the
    output the layer gave in eval mode with ``eval_rank=rank`` -- with smaller tensors, so it
    saves, merges and exports at that rank. Build the optimizer after truncating.
    """
    layers = {name: layer for name, layer in adapter_layers(model).items() if isinstance(layer, DyLoraLayer)}
    if not layers:
        raise RankwiseError(
            "truncate needs a model adapted with 'dylora'; call rankwise.adapt(model, 'dylora', ...) first"
        )
    for name, layer in layers.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= layer.rank:
            raise RankwiseError(
                f"cannot truncate {name!r} (rank {layer.rank}) to {rank!r}: choose an integer in [1, {layer.rank}]"
            )
        if layer.merged:
            raise RankwiseError(f"{name!r} is merged; call rankwise.unmerge(model) before truncate")
    for layer in layers.values():
        layer.truncate_(rank)
    return model
