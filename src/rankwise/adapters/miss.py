"""MiSS: Bone's successor as PEFT ships it (``MissConfig``), three forms of one shared block.

Kang et al., "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure"
(formerly "Bone: Block Affine Transformation ...", "Block-Affine Adaptation", DiSHA),
arXiv 2409.15371. The forms are PEFT 0.21's ``init_weights`` values; ``r`` = ``rank``, ``W`` is
``out x in``, all trainable tensors zero at init (the model starts as the base):

- ``variant="miss"`` (PEFT's default ``init_weights=True``): ``D`` is ``r x out``; the input is
  zero-padded to a multiple of ``r``, cut into length-``r`` chunks and summed, then mapped by
  ``D^T``: ``h = W x + D^T sum_c x_c``, i.e. ``dW[o, i] = D[i mod r, o]`` = ``D^T A`` with
  ``A[j, i] = 1`` iff ``i mod r = j``. Rank <= r, ``r * out`` parameters; never forms ``dW``.
- ``variant="mini"``: ``D`` is ``r x mini_r``, tiled ``out / mini_r`` times along the output
  (``D_full[j, o] = D[j, o mod mini_r]``): ``r * mini_r`` parameters; needs ``out % mini_r == 0``.
- ``variant="bat"``: Bone's weight guide, ``dW_ab = W_ab D_a + D_a`` over ``r x r`` blocks with
  ``D`` of shape ``(out/r) x r x r`` (:mod:`~rankwise.adapters.block_affine_family`): ``out * r``
  parameters; forms the update in every forward, needs ``r`` to divide both dimensions.

Deviations from PEFT: none in the update. MiSS has no scaling, so ``alpha`` is accepted and
unused; ``dropout`` acts on the adapter path's input in every variant (PEFT's "bat" path has no
dropout; outputs agree in eval mode). ``rank`` may go up to ``in_features`` (PEFT's bound).
Export: PEFT's own MiSS format (``peft_type`` "MISS", key ``<module>.miss_block``) for
``nn.Linear`` layers (PEFT's MiSS takes only those); otherwise "miss" / "mini" export exactly
as LoRA (``D_full^T``, ``A``) and "bat" as the best rank-k LoRA with its error reported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, PeftNative
from rankwise.adapters.block_affine_family import WeightGuidedLayer
from rankwise.options import Option

#: rankwise's variant -> PEFT's ``MissConfig.init_weights``
PEFT_INIT = {"miss": True, "bat": "bat", "mini": "mini"}


@ADAPTERS.register(
    "miss",
    family="block_affine",
    paper="MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure",
    arxiv="2409.15371",
    supports=LINEAR_LIKE,
)
class MissLayer(WeightGuidedLayer):
    """``h = W x + D_full^T sum_c x_c`` ("miss", "mini") or Bone's ``W_ab D_a + D_a`` ("bat")."""

    OPTIONS = {
        "variant": Option("miss", str, choices=tuple(PEFT_INIT),
                          help="PEFT's init_weights: 'miss' (True, D r x out), 'mini' (D r x mini_r, tiled), "
                               "'bat' (Bone's weight guide)"),
        "mini_r": Option(1, int, low=1, help="width of the tiled block of variant='mini' (divides out_features)"),
    }
    bones_name = "miss_block"

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        return in_features

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.variant = self.options["variant"]
        mini_r = self.options["mini_r"]
        if self.variant == "bat":
            self.allocate_bones()
            return
        if self.variant == "mini" and self.out_features % mini_r:
            raise self.error(
                f"mini_r={mini_r} must divide out_features={self.out_features} (the block is tiled along the "
                "output); choose a divisor of it or exclude the layer"
            )
        width = mini_r if self.variant == "mini" else self.out_features
        self.miss_block = nn.Parameter(torch.empty(self.rank, width, **self.factory))

    @property
    def guided(self) -> bool:
        return self.options["variant"] == "bat"

    def full_block(self) -> torch.Tensor:
        """``D_full`` (``r x out``): the block itself, or the mini block tiled along the output."""
        if self.variant == "mini":
            return self.miss_block.repeat(1, self.out_features // self.options["mini_r"])
        return self.miss_block

    def chunk_selector(self, dtype: torch.dtype) -> torch.Tensor:
        """``A`` (``r x in``): ``A[j, i] = 1`` iff ``i mod r = j`` (the chunk sum as a matrix)."""
        columns = torch.arange(self.in_features, device=self.miss_block.device)
        rows = torch.arange(self.rank, device=self.miss_block.device)
        return (columns[None, :] % self.rank == rows[:, None]).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        if self.guided:
            return super().delta_weight()
        block = self.full_block()
        return block.T @ self.chunk_selector(block.dtype)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.guided:
            return super().adapter_forward(x)
        block = self.miss_block
        padding = -self.in_features % self.rank
        chunks = F.pad(x.to(block.dtype), (0, padding)).reshape(*x.shape[:-1], -1, self.rank).sum(dim=-2)
        out = chunks @ block
        if self.variant == "mini":
            out = out.repeat(*([1] * (x.ndim - 1)), self.out_features // self.options["mini_r"])
        return out

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.guided:
            return None
        return self.full_block().detach().float().T, self.chunk_selector(torch.float32)

    def peft_native(self) -> PeftNative | None:
        if self.kind != "linear":
            return None
        config = {"r": self.rank, "mini_r": self.options["mini_r"], "init_weights": PEFT_INIT[self.variant],
                  "miss_dropout": float(self.options["dropout"]), "bias": "none", "modules_to_save": None,
                  "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}
        return PeftNative("MISS", config, {"miss_block": self.miss_block})
