"""What Bone and MiSS share: the block-affine "weight guide" update, written once.

Kang 2024, "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for
Large Language Models", arXiv 2409.15371 (v1; later versions are "Block-Affine Adaptation",
DiSHA and MiSS).

The ``out x in`` weight ``W`` is cut into ``r x r`` blocks ``W_ab`` (``a`` the output block,
``b`` the input block: ``W_ab[i, j] = W[a r + i, b r + j]``). One trainable ``r x r`` matrix
is shared by a line of blocks and both multiplies the block (the weight guides the update)
and is added to it::

    structure "col":  dW_ab = W_ab D_a + D_a     D: (out / r) x r x r   (one per output block)
    structure "row":  dW_ab = W_ab D_b + D_b     D: (in / r)  x r x r   (one per input block)

"col" is the authors' default (their code's ``Bone-col``; PEFT's MiSS ``init_weights="bat"``),
"row" the other structure of the paper (``Bone-row``). Since the update reads ``W``, the merged
weight is ``W' = W (I + D) + D`` blockwise and unmerging solves for ``W``:
``W_ab = (W'_ab - D) (I + D)^{-1}``, which needs every ``I + D`` invertible.

- :func:`split_blocks` / :func:`join_blocks`: the ``(out/r, in/r, r, r)`` block view;
- :func:`guided_update` and :func:`unguided_weight`: the update and the merge's inverse;
- :class:`WeightGuidedLayer`: a layer whose update is :func:`guided_update` of the ORIGINAL
  weight in either merge state (recovered by :func:`unguided_weight` while merged).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import AdapterLayer
from rankwise.errors import RankwiseError
from rankwise.options import Option

STRUCTURES = ("col", "row")
STRUCTURE = Option(
    "col", str, choices=STRUCTURES,
    help="which blocks share a matrix: 'col' one D per output block (out*r parameters, the paper's default), "
         "'row' one D per input block (in*r parameters)",
)


def split_blocks(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """``B[a, b, i, j] = M[a r + i, b r + j]`` for an ``out x in`` matrix (both divisible by ``r``)."""
    out_features, in_features = matrix.shape
    return matrix.reshape(out_features // r, r, in_features // r, r).permute(0, 2, 1, 3)


def join_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`split_blocks`."""
    a, b, r, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(a * r, b * r)


def _shared(bones: torch.Tensor, structure: str) -> torch.Tensor:
    """``D`` broadcast over the block grid: ``D_a`` along each output block row, or ``D_b`` along each column."""
    return bones[:, None] if structure == "col" else bones[None, :]


def guided_update(weight: torch.Tensor, bones: torch.Tensor, structure: str) -> torch.Tensor:
    """``dW_ab = W_ab D + D`` with ``D = D_a`` ("col") or ``D_b`` ("row"); an ``out x in`` matrix."""
    shared = _shared(bones, structure)
    return join_blocks(split_blocks(weight, bones.shape[-1]) @ shared + shared)


def unguided_weight(merged: torch.Tensor, bones: torch.Tensor, structure: str) -> torch.Tensor:
    """``W`` from ``W' = W + guided_update(W)``: ``W_ab = (W'_ab - D)(I + D)^{-1}`` (in fp32 at least).
    RankwiseError when some ``I + D`` is singular (then ``W`` is not determined by ``W'``)."""
    dtype = torch.float64 if merged.dtype == torch.float64 else torch.float32
    bones = bones.to(dtype)
    eye = torch.eye(bones.shape[-1], device=bones.device, dtype=dtype)
    inverse, info = torch.linalg.inv_ex(eye + bones)
    if bool((info != 0).any()):
        block = int(torch.nonzero(info)[0])
        raise RankwiseError(
            f"I + D is singular for shared block {block} ({'output' if structure == 'col' else 'input'} block "
            f"{block}), so the merged weight does not determine the original one"
        )
    difference = split_blocks(merged.to(dtype), bones.shape[-1]) - _shared(bones, structure)
    return join_blocks(difference @ _shared(inverse, structure))


class WeightGuidedLayer(AdapterLayer):
    """An update ``guided_update(W, D, structure)`` of the original weight ``W``, with ``D`` the
    trainable parameter named by :attr:`bones_name` (zeros at init, so the model starts as the base)."""

    #: the attribute holding D (its key in saved files)
    bones_name = "bones"

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        r = self.rank
        if self.guided and (self.in_features % r or self.out_features % r):
            common = [d for d in range(1, min(self.in_features, self.out_features) + 1)
                      if self.in_features % d == 0 and self.out_features % d == 0]
            raise self.error(
                f"block size r={r} must divide both dimensions of the {self.out_features} x {self.in_features} weight "
                f"(it is cut into r x r blocks); choose r among the common divisors {common[-8:]} or exclude the layer"
            )

    @property
    def structure(self) -> str:
        return "col"

    @property
    def guided(self) -> bool:
        """Whether the update is the weight-guided one (a subclass may offer other forms)."""
        return True

    def bones(self) -> torch.Tensor:
        return getattr(self, self.bones_name)

    def allocate_bones(self) -> None:
        count = (self.out_features if self.structure == "col" else self.in_features) // self.rank
        setattr(self, self.bones_name, nn.Parameter(torch.empty(count, self.rank, self.rank, **self.factory)))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            self.bones().zero_()

    def guide_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The original ``W`` (undoing this layer's own merge, which the base holds then)."""
        weight = self.base_weight(torch.float64 if dtype == torch.float64 else torch.float32)
        if self.merged:
            try:
                weight = unguided_weight(weight, self.bones().detach(), self.structure)
            except RankwiseError as exc:
                raise self.error(
                    f"cannot recover the original weight from the merged one: {exc}; unload(model) keeps the "
                    "merged weight, or reload the base and load_adapter"
                ) from None
        return weight.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        bones = self.bones()
        return guided_update(self.guide_weight(bones.dtype), bones, self.structure)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        bones = self.bones()
        if self.structure == "col":
            # D_a sits between W_ab and x_b: the update has to be formed (the paper's cost)
            return self.project_in(x, self.delta_weight())
        # "row": dW x = W z + (sum_b z_b) on every output block, with z_b = D_b x_b -- no out x in update
        r = self.rank
        chunks = x.to(bones.dtype).reshape(*x.shape[:-1], self.in_features // r, r)
        z = torch.einsum("bij,...bj->...bi", bones, chunks)
        guided = z.reshape(x.shape) @ self.guide_weight(bones.dtype).T
        summed = z.sum(dim=-2)
        return guided + summed.repeat(*([1] * (x.ndim - 1)), self.out_features // r)
