"""Triangular decompositions of a weight matrix: sign-fixed QR and pivoted LDU.

Both compute in float32 (float64 inputs stay float64) on the input's own device and
return factors in that compute dtype; callers cast back.

- :func:`signed_qr` -- reduced QR ``W = Q R`` (``Q`` is ``m x k`` with orthonormal columns,
  ``R`` is ``k x n`` upper triangular, ``k = min(m, n)``), with the signs chosen so that
  ``diag(R) >= 0``: Householder QR is unique only up to the sign of each column of ``Q``
  (and the matching row of ``R``); fixing the sign makes the factors reproducible.
- :func:`ldu` -- LU with partial (row) pivoting, ``W = P L U``, rescaled to
  ``W = P L diag(d) U'`` with ``d = diag(U)`` and ``U' = diag(d)^{-1} U`` unit upper
  triangular. ``L`` is ``m x k`` unit lower triangular, ``U'`` is ``k x n``. The row
  permutation is returned as an index vector ``perm`` (``(P L)[i] = L[perm[i]]``), not as an
  ``m x m`` matrix.

Both take ``rank``: only the first ``r`` columns of ``Q`` / ``P L``, rows of ``R`` / ``U'`` and
pivots, computed without the full factorisation -- the same factors, at O(m r^2 + m n r)
instead of O(m n k). Both algorithms process the columns left to right and step ``j`` only
reads column ``j`` of what the earlier steps left, so the first ``r`` steps on ``W`` are the
steps on ``W[:, :r]``:

- QR: ``Q_r R_11`` is the (signed) QR of ``W[:, :r]`` and ``R[:r, :] = Q_r^T W``
  (``W = Q R`` and ``Q`` has orthonormal columns); the ``r x r`` block is kept from the
  small QR, so it is exactly upper triangular;
- LDU: ``(P L)_r U_11 = W[:, :r]`` is the pivoted LU of the first ``r`` columns (the later row
  swaps of the full LU only permute rows of ``L`` together with the rows of ``P``), and
  ``U[:r, :] = L_11^{-1} W[piv, :]``, with ``piv`` the ``r`` pivot rows of ``W`` and ``L_11``
  their unit lower-triangular block of ``P L``.
"""

from __future__ import annotations

import torch


def _work_copy(matrix: torch.Tensor) -> torch.Tensor:
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(matrix.shape)}")
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    work = matrix.detach().to(dtype)
    if not torch.isfinite(work).all():
        raise ValueError("matrix has non-finite entries")
    return work


def _leading(work: torch.Tensor, rank: int | None) -> int:
    k = min(work.shape)
    if rank is None:
        return k
    if not 1 <= rank <= k:
        raise ValueError(f"rank must be in [1, {k}] for a {work.shape[0]} x {work.shape[1]} matrix, got {rank}")
    return rank


def signed_qr(matrix: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR ``matrix = Q @ R`` with a non-negative diagonal of ``R``; with ``rank``, only
    ``Q[:, :rank]`` and ``R[:rank, :]`` (module docstring: from the QR of the first ``rank`` columns)."""
    work = _work_copy(matrix)
    r = _leading(work, rank)
    q, triangle = torch.linalg.qr(work[:, :r])
    signs = torch.sign(torch.diagonal(triangle))
    signs[signs == 0] = 1
    q, triangle = q * signs, triangle * signs[:, None]
    # R[:r, r:] = Q_r^T W[:, r:]; the r x r block stays the small QR's (exactly triangular).
    return q, torch.cat([triangle, q.T @ work[:, r:]], dim=1)


def ldu(matrix: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pivoted LDU: returns ``perm, L, d, U`` with ``matrix = L[perm] @ diag(d) @ U``.

    ``L`` (``m x k``) is unit lower triangular, ``U`` (``k x n``) unit upper triangular and
    ``d`` (``k``) the pivots. With ``rank``, ``L`` is ``m x rank``, ``d`` and ``U`` the first
    ``rank`` pivots and rows, and ``L[perm] @ diag(d) @ U`` the first ``rank`` LDU components
    (module docstring). A zero pivot (rank-deficient leading block) leaves the corresponding
    row of ``U`` undefined; such rows are returned as non-finite and callers must check ``d``
    before using them.
    """
    work = _work_copy(matrix)
    r = _leading(work, rank)
    packed, swaps, _ = torch.linalg.lu_factor_ex(work[:, :r])  # a zero pivot is the caller's to refuse (d)
    # LAPACK's pivots are row swaps (step j swaps rows j and swaps[j] - 1): replaying the r of them
    # gives the row order with W[order] = L U, without the m x m permutation matrix torch.linalg.lu builds.
    order = list(range(work.shape[0]))
    for j, swap in enumerate(swaps.tolist()):
        order[j], order[swap - 1] = order[swap - 1], order[j]
    order = torch.tensor(order, device=work.device)
    lower = torch.tril(packed, diagonal=-1) + torch.eye(*packed.shape, dtype=work.dtype, device=work.device)
    # row i of P L is row perm[i] of L (perm inverts order); rows order[:r] of W are the pivot rows
    perm = torch.argsort(order)
    upper = torch.linalg.solve_triangular(lower[:r], work[order[:r]], upper=False, unitriangular=True)
    pivots = torch.diagonal(upper).clone()
    return perm, lower, pivots, upper / pivots[:, None]
