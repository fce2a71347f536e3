"""Bone: block-affine adaptation with the weight guide.

Kang 2024, "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for
Large Language Models", arXiv 2409.15371 (v1, the "weight guide"; the paper was later renamed
Block-Affine Adaptation, DiSHA and MiSS -- PEFT ships the successor as ``miss``, which see).

The ``out x in`` weight is cut into ``r x r`` blocks ``W_ab`` (``r`` = ``rank``, the block size,
as in the paper) and a line of blocks shares one trainable ``r x r`` matrix ``D`` that both
multiplies the block and is added to it (:mod:`~rankwise.adapters.block_affine_family`)::

    structure="col" (default, the authors' Bone-col):  dW_ab = W_ab D_a + D_a,  D: (out/r) x r x r
    structure="row" (Bone-row):                         dW_ab = W_ab D_b + D_b,  D: (in/r) x r x r

``D = 0`` at init, so the model starts as the base. Trainable parameters per layer: ``out * r``
("col") or ``in * r`` ("row"). The update reads the frozen weight, so "col" forms the
``out x in`` update in every forward (the paper's cost); "row" factors as ``W z + sum_b z_b``
with ``z_b = D_b x_b`` and never forms it. Unmerge inverts ``W' = W (I + D) + D`` per block (it
needs every ``I + D`` invertible). Requires ``r`` to divide both dimensions.

Deviations: the paper has no scaling; ``alpha`` is accepted (the framework's) and unused.
Bone is not in PEFT 0.21 (its ``bone`` tuner was replaced by ``miss``); "col" equals MiSS
``init_weights="bat"``, so the export writes that format (``peft_type`` "MISS"); "row" has no
PEFT form and exports as the best rank-k LoRA of its (full-rank) update, with the error reported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, PeftNative
from rankwise.adapters.block_affine_family import STRUCTURE, WeightGuidedLayer


@ADAPTERS.register(
    "bone",
    family="block_affine",
    paper="Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for Large Language Models",
    arxiv="2409.15371",
    supports=LINEAR_LIKE,
)
class BoneLayer(WeightGuidedLayer):
    """``dW_ab = W_ab D + D`` with ``D`` shared per output block ("col") or per input block ("row")."""

    OPTIONS = {"structure": STRUCTURE}
    bones_name = "bone"

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.allocate_bones()

    @property
    def structure(self) -> str:
        return self.options["structure"]

    def peft_native(self) -> PeftNative | None:
        if self.structure != "col" or self.kind != "linear":
            return None
        config = {"r": self.rank, "mini_r": 1, "init_weights": "bat", "miss_dropout": float(self.options["dropout"]),
                  "bias": "none", "modules_to_save": None, "exclude_modules": None,
                  "layers_to_transform": None, "layers_pattern": None}
        return PeftNative("MISS", config, {"miss_block": self.bone})
