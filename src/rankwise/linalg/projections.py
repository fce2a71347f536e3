"""Shared math of gradient projection: orthonormal bases, orientation, subspace switches.

A weight gradient ``G`` is ``m x n``. A :class:`Basis` holds up to two matrices with
orthonormal columns, ``L`` (``m x r``, acting on rows) and ``R`` (``n x r``, acting on
columns); either may be absent. Then

- project:       ``low = L^T G R``            (a missing side is the identity)
- project back:  ``L low R^T``                (the orthogonal projection ``L L^T G R R^T``)
- switch from an old basis to a new one: coordinates in the old subspace map to the new
  one through ``C_L = L_new^T L_old`` and ``C_R = R_old^T R_new``:
  ``low_new = C_L low_old C_R`` (exact when ``G`` lies in both subspaces).

Orientation (``proj_type``, the GaLore convention, arXiv 2403.03507):

- ``std``: project the longer side away, keep the shorter one: left (``L``) when ``m < n``,
  right (``R``) when ``m >= n``; the state is then ``r x max(m, n)`` and the basis
  ``min(m, n) x r``.
- ``reverse_std``: the opposite side; ``left`` / ``right``: always that side; ``full``: both.

Random projections (:func:`seeded_gaussian`) are regenerated from an integer seed, so a
checkpoint stores the seed, not the matrix, and a resumed run draws the same matrix.

Subspace refresh (:func:`singular_bases`), by ``mode``:

- ``svd``: the exact thin SVD (GaLore's).
- ``randomized``: Halko et al.'s range finder with ``oversample`` extra columns and ``niter``
  power iterations (:func:`rankwise.linalg.svd.randomized_svd`); the Gaussian test matrix is
  drawn from the matrix's own integer seed, so a resumed run draws the same one.
- ``warm``: ``niter`` block power iterations (:func:`rankwise.linalg.svd.warm_svd`) started
  from the previous basis, widened by ``oversample`` seeded random directions ``W Omega``
  (LDAdam's warm start, arXiv 2410.16103, which uses one iteration and no widening); a
  matrix with no previous basis takes the ``randomized`` route.

Matrices of the same shape, dtype and device are decomposed in one batched call; the
result for each is the one it would get alone (same seed, same routine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rankwise.linalg.svd import randomized_svd, svd, warm_svd

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
REFRESH_MODES = ("svd", "randomized", "warm")


def projection_sides(shape: tuple[int, ...] | torch.Size, proj_type: str) -> tuple[bool, bool]:
    """``(use_left, use_right)`` for an ``m x n`` gradient under ``proj_type``."""
    m, n = shape
    if proj_type == "std":
        return (True, False) if m < n else (False, True)
    if proj_type == "reverse_std":
        return (False, True) if m < n else (True, False)
    if proj_type == "left":
        return True, False
    if proj_type == "right":
        return False, True
    if proj_type == "full":
        return True, True
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def projected_shape(shape: tuple[int, ...] | torch.Size, rank: int, proj_type: str) -> tuple[int, int]:
    """Shape of ``L^T G R`` for an ``m x n`` gradient."""
    use_left, use_right = projection_sides(shape, proj_type)
    m, n = shape
    return (rank if use_left else m, rank if use_right else n)


@dataclass(frozen=True)
class Basis:
    """Orthonormal-column factors ``L`` (``m x r``) and/or ``R`` (``n x r``) of a subspace."""

    left: torch.Tensor | None
    right: torch.Tensor | None

    def project(self, matrix: torch.Tensor) -> torch.Tensor:
        """``L^T G R``."""
        if self.left is not None:
            matrix = self.left.T @ matrix
        if self.right is not None:
            matrix = matrix @ self.right
        return matrix

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        """``L low R^T``."""
        if self.left is not None:
            low = self.left @ low
        if self.right is not None:
            low = low @ self.right.T
        return low

    def add_back_(self, target: torch.Tensor, low: torch.Tensor, alpha: float) -> torch.Tensor:
        """``target += alpha L low R^T`` in place; returns ``target``.

        The last product is accumulated into ``target`` by one ``addmm_`` instead of
        materialising the ``m x n`` update (one full-size temporary and two passes over it
        less per step); mixed dtypes, and a subclass with its own :meth:`project_back` (a
        coordinate basis without factors), take the unfused path.
        """
        if type(self).project_back is not Basis.project_back:
            return target.add_(self.project_back(low), alpha=alpha)
        if self.left is not None and self.right is not None:
            first, second = self.left @ low, self.right.T
        elif self.left is not None:
            first, second = self.left, low
        elif self.right is not None:
            first, second = low, self.right.T
        else:
            return target.add_(low, alpha=alpha)
        if target.dim() != 2 or not first.dtype == second.dtype == target.dtype:
            return target.add_(first @ second, alpha=alpha)
        return target.addmm_(first, second, alpha=alpha)

    def transition(self, new: "Basis") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(C_L, C_R)`` with ``low_new = C_L low_old C_R`` (``None`` for a missing side)."""
        if (self.left is None) != (new.left is None) or (self.right is None) != (new.right is None):
            raise ValueError("cannot switch between bases projecting on different sides")
        c_left = new.left.T @ self.left if self.left is not None else None
        c_right = self.right.T @ new.right if self.right is not None else None
        return c_left, c_right


def change_coordinates(
    low: torch.Tensor, c_left: torch.Tensor | None, c_right: torch.Tensor | None, *, squared: bool = False
) -> torch.Tensor:
    """``C_L low C_R``; with ``squared`` the element-wise squares ``(C_L o C_L) low (C_R o C_R)``.

    The squared form carries a second moment (a non-negative per-coordinate variance) into
    the new coordinates: it is exact for permutations and sign flips and keeps the result
    non-negative otherwise.
    """
    if c_left is not None:
        low = (c_left * c_left if squared else c_left) @ low
    if c_right is not None:
        low = low @ (c_right * c_right if squared else c_right)
    return low


def singular_basis(matrix: torch.Tensor, rank: int, *, use_left: bool, use_right: bool) -> Basis:
    """Top-``rank`` singular vectors of ``matrix`` (exact SVD in float32) on the requested sides.

    ``L = U[:, :r]``, ``R = V[:, :r]``, returned contiguous in ``matrix.dtype`` (the copies
    own their memory, so the discarded singular vectors are freed). Raises
    :class:`rankwise.linalg.SVDFailure` on non-finite input or non-convergence.
    """
    return singular_bases([matrix], rank, use_left=use_left, use_right=use_right)[0]


def singular_bases(
    matrices: Sequence[torch.Tensor],
    rank: int,
    *,
    use_left: bool,
    use_right: bool,
    mode: str = "svd",
    niter: int = 2,
    oversample: int = 10,
    seeds: Sequence[int] | None = None,
    previous: Sequence[Basis | None] | None = None,
) -> list[Basis]:
    """Top-``rank`` singular bases of each matrix by ``mode`` (see the module docstring).

    ``seeds`` (one int per matrix) draw the random test matrices of ``randomized`` / ``warm``;
    ``previous`` holds each matrix's last basis for ``warm``. Same-shape matrices share one
    batched decomposition. Factors are contiguous in each matrix's dtype. Raises
    :class:`rankwise.linalg.SVDFailure` when any matrix of a batch is not finite or fails.
    """
    if mode not in REFRESH_MODES:
        raise ValueError(f"refresh mode must be one of {REFRESH_MODES}, got {mode!r}")
    count = len(matrices)
    seeds = list(seeds) if seeds is not None else [0] * count
    previous = list(previous) if previous is not None else [None] * count
    batches: dict[tuple, list[int]] = {}
    for index, matrix in enumerate(matrices):
        warm = mode == "warm" and previous[index] is not None
        batches.setdefault((tuple(matrix.shape), matrix.dtype, matrix.device, warm), []).append(index)
    result: list[Basis | None] = [None] * count
    for (_, dtype, _, warm), members in batches.items():
        stacked = torch.stack([matrices[i].detach() for i in members])
        # The range finder works on the left side: orient the matrix so the wanted side is that one.
        flip = mode != "svd" and not use_left
        u, _, vh = _top_triplets(stacked.mT if flip else stacked, rank, mode, warm, niter, oversample,
                                 [seeds[i] for i in members], [previous[i] for i in members], not flip)
        lefts, rights = (vh.mT, u) if flip else (u, vh.mT)
        for position, index in enumerate(members):
            left = lefts[position].to(dtype).contiguous() if use_left else None
            right = rights[position].to(dtype).contiguous() if use_right else None
            result[index] = Basis(left, right)
    return result  # type: ignore[return-value]


def _top_triplets(
    oriented: torch.Tensor, rank: int, mode: str, warm: bool, niter: int, oversample: int,
    seeds: Sequence[int], previous: Sequence[Basis | None], left_side: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if mode == "svd":
        u, s, vh = svd(oriented)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :]
    rows, cols = oriented.shape[-2:]
    extra = min(oversample, min(rows, cols) - rank) if warm else min(rank + oversample, rows, cols)
    device = oriented.device
    sketch = torch.stack([seeded_gaussian(cols, extra, seed, device=device) for seed in seeds]) if extra > 0 else None
    if not warm:
        return randomized_svd(oriented, rank, niter=niter, sketch=sketch)
    compute = torch.float64 if oriented.dtype == torch.float64 else torch.float32
    start = torch.stack([(basis.left if left_side else basis.right) for basis in previous])  # type: ignore[union-attr]
    start = start.to(device=device, dtype=compute)
    if sketch is not None:
        start = torch.cat([start, oriented.to(compute) @ sketch.to(compute)], dim=-1)
    return warm_svd(oriented, start, rank, niter=niter)


def seeded_gaussian(
    rows: int,
    cols: int,
    seed: int,
    *,
    std: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``rows x cols`` matrix with i.i.d. ``N(0, std^2)`` entries drawn from ``seed`` alone.

    The generator lives on ``device`` (CPU and CUDA streams differ; the same seed on the
    same device type always gives the same matrix). Drawn in float32, returned in ``dtype``.
    """
    if torch.device(device).type == "meta":  # shapes only (the memory bench): nothing to draw
        return torch.empty(rows, cols, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    sample = torch.randn(rows, cols, generator=generator, device=device, dtype=torch.float32)
    return sample.mul_(std).to(dtype)
