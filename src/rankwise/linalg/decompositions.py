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


def signed_qr(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced QR ``matrix = Q @ R`` with a non-negative diagonal of ``R``."""
    q, r = torch.linalg.qr(_work_copy(matrix))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs, r * signs[:, None]


def ldu(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pivoted LDU: returns ``perm, L, d, U`` with ``matrix = L[perm] @ diag(d) @ U``.

    ``L`` (``m x k``) is unit lower triangular, ``U`` (``k x n``) unit upper triangular and
    ``d`` (``k``) the pivots. A zero pivot (rank-deficient leading block) leaves the
    corresponding row of ``U`` undefined; such rows are returned as non-finite and callers
    must check ``d`` before using them.
    """
    permutation, lower, upper = torch.linalg.lu(_work_copy(matrix))
    pivots = torch.diagonal(upper).clone()
    # P is a permutation matrix: row i of P @ L is row perm[i] of L.
    perm = permutation.argmax(dim=1)
    return perm, lower, pivots, upper / pivots[:, None]
