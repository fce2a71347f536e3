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

Init as LoRA: ``A`` kaiming-uniform, ``B = 0`` (the model equals the base model at init); the
factors are the LoRA family's (:class:`~rankwise.adapters.lora_family.LoraFactorsLayer`, whose
``scaling = alpha / r`` is the full-rank one; truncated blocks use ``alpha / b``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.api import adapter_layers
from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.lora_family import LoraFactorsLayer
from rankwise.errors import RankwiseError
from rankwise.options import Option


def sample_rank(seed: int, step: int, low: int, high: int) -> int:
    """``b ~ Uniform{low, ..., high}``, the same for every layer given ``(seed, step)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.randint(low, high + 1, (1,), generator=generator))


@ADAPTERS.register(
    "dylora",
    family="dynamic_rank",
    paper="DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation",
    arxiv="2210.07558",
    supports=LINEAR_LIKE,
)
class DyLoraLayer(LoraFactorsLayer):
    """LoRA block whose leading ``b x b`` sub-blocks are trained together (nested ranks)."""

    OPTIONS = {
        "min_rank": Option(1, int, low=1, help="smallest sampled rank b (at most rank)"),
        "eval_rank": Option(None, int, low=1, nullable=True, help="rank used in eval mode (at most rank); None = rank"),
        "frozen": Option(
            True, bool, help="only the b-th row / column learns (the paper's rule); False: all of the block"
        ),
        "seed": Option(0, int, low=0, help="seed of the rank sampling, shared by all layers"),
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        for name in ("min_rank", "eval_rank"):
            if (self.options[name] or 1) > self.rank:
                raise self.error(f"{name} {self.options[name]} is above the rank {self.rank}; lower it")
        self.sampled_rank = self.draw_rank(0)
        self.merged_rank = self.rank

    def draw_rank(self, step: int) -> int:
        return sample_rank(self.options["seed"], step, self.options["min_rank"], self.rank)

    def initialize(self, stats: Any = None) -> None:
        self.reset_lora_factors()

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

    def merge(self, *, allow_lossy: bool = False) -> None:
        if not self.merged:
            self.refuse_lossy("merge", allow_lossy)
            self.merged_rank = self.current_rank()
        super().merge(allow_lossy=allow_lossy)

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
        self.scaling = self.lora_scaling()
        self.options["min_rank"] = min(self.options["min_rank"], rank)
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
        Option(1, int, low=1, high=layer.rank, help="rank to keep").check("rank", rank, f"truncate {name!r}")
        if layer.merged:
            raise RankwiseError(f"{name!r} is merged; call rankwise.unmerge(model) before truncate")
    for layer in layers.values():
        layer.truncate_(rank)
    return model
