"""What a fine-tune changed: the spectrum of each layer's update, and how two updates' subspaces overlap.

* ``update_spectrum(base, tuned)``: singular values of ``dW = W1 - W0``, per layer for two
  models (``{layer name: spectrum}``) or for two matrices / layers (one spectrum).
* ``subspace_overlap(dW1, dW2, k)``: the principal angles between the top-``k`` left (or
  right) singular subspaces ``U1``, ``U2`` of two updates (Bjorck & Golub, "Numerical methods
  for computing angles between linear subspaces", Math. Comp. 27, 1973): ``cos theta_i`` are
  the singular values of ``U1^T U2``. ``overlap = ||U1^T U2||_F^2 / k = mean cos^2 theta_i``
  is the normalised subspace similarity of the LoRA paper (Hu et al., "LoRA: Low-Rank
  Adaptation of Large Language Models", arXiv 2106.09685, section 7.2): 1 for the same
  subspace, ``k / n`` expected for random ones in ``R^n``, 0 for orthogonal ones. ``k``
  defaults to the smaller numerical rank of the two updates: singular values above
  ``sigma_1 * max(m, n) * eps_float32`` (float32 precision even for float64 input, since an
  update is usually a difference of float32 weights, whose rounding would otherwise count
  as rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.analyze.selection import layer_matrix, paired_layers, weight_difference
from rankwise.analyze.spectrum import MatrixLike, as_matrix, spectrum
from rankwise.errors import RankwiseError
from rankwise.linalg.svd import svd
from rankwise.targets import Targets


def update_spectrum(base: MatrixLike | nn.Module, tuned: MatrixLike | nn.Module,
                    targets: Targets = "all-linear") -> dict[str, torch.Tensor] | torch.Tensor:
    """Singular values (descending, float32) of ``tuned - base``: one tensor for two matrices or
    layers, ``{layer name: tensor}`` over the ``targets`` layers for two models."""
    if isinstance(base, torch.Tensor) or isinstance(tuned, torch.Tensor) or _is_single_layer(tuned):
        w0, w1 = as_matrix(base), as_matrix(tuned)
        if w0.shape != w1.shape:
            raise RankwiseError(f"base and tuned matrices differ in shape: {tuple(w0.shape)} vs {tuple(w1.shape)}")
        return spectrum(weight_difference(w0, w1))
    return {name: spectrum(weight_difference(layer_matrix(base, name), layer_matrix(tuned, name)))
            for name in paired_layers(base, tuned, targets)}


def _is_single_layer(module: nn.Module) -> bool:
    try:
        as_matrix(module)
    except RankwiseError:
        return False
    return True


@dataclass(frozen=True)
class SubspaceOverlap:
    """Principal angles between two ``k``-dimensional subspaces; ``float()`` is ``overlap``."""

    k: int
    cosines: tuple[float, ...]  # cos theta_i, descending
    overlap: float  # mean cos^2 theta_i, in [0, 1]

    @property
    def angles_degrees(self) -> tuple[float, ...]:
        return tuple(math.degrees(math.acos(min(1.0, c))) for c in self.cosines)

    def __float__(self) -> float:
        return self.overlap


def _numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 0
    tolerance = singular_values[0] * max(shape) * torch.finfo(torch.float32).eps
    return int((singular_values > tolerance).sum())


def subspace_overlap(update1: MatrixLike, update2: MatrixLike, k: int | None = None,
                     side: str = "left") -> SubspaceOverlap:
    """Principal angles between the top-``k`` ``side`` (``"left"``: output, ``"right"``: input)
    singular subspaces of two updates of one shape (see the module docstring)."""
    if side not in ("left", "right"):
        raise RankwiseError(f"side must be 'left' (output space) or 'right' (input space), got {side!r}")
    a, b = as_matrix(update1), as_matrix(update2)
    if a.shape != b.shape:
        raise RankwiseError(f"the two updates differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    (u1, s1, vh1), (u2, s2, vh2) = svd(a, dtype=dtype), svd(b.to(a.device), dtype=dtype)
    ranks = (_numerical_rank(s1, tuple(a.shape)), _numerical_rank(s2, tuple(b.shape)))
    if min(ranks) == 0:
        raise RankwiseError("an all-zero update has no subspace; pass two non-zero updates")
    if k is None:
        k = min(ranks)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(a.shape):
        raise RankwiseError(f"k must be an integer in [1, {min(a.shape)}], got {k!r}")
    basis1, basis2 = (u1[:, :k], u2[:, :k]) if side == "left" else (vh1[:k].T, vh2[:k].T)
    cosines = torch.linalg.svdvals(basis1.T @ basis2).clamp(max=1.0)
    return SubspaceOverlap(k, tuple(float(c) for c in cosines), float(cosines.pow(2).mean()))
