"""Singular value decompositions that are robust and dtype-safe.

All routines compute in float32 (or float64 when asked) whatever the input dtype, on the
input's own device, and return factors in that compute dtype; callers cast back.

- :func:`svd` -- thin SVD ``W = U diag(S) Vh``; retries in float64 when the float32 LAPACK
  / cuSOLVER call fails to converge, and raises :class:`SVDFailure` if the input is not
  finite or both attempts fail.
- :func:`randomized_svd` -- Halko, Martinsson & Tropp (2011), "Finding structure with
  randomness", Alg. 4.4 with ``niter`` power iterations: ``Y = (W W^T)^q W Omega``,
  ``Q = qr(Y)``, ``B = Q^T W``, ``svd(B)``; the cost is O(mn(k+p)) instead of O(mn min(m,n)).
- :func:`truncated_svd` -- the top-``rank`` triplets by either route.
- :func:`orthonormal_basis` -- reduced QR, columns of Q with R's diagonal made positive
  so the basis is unique.
"""

from __future__ import annotations

import torch


class SVDFailure(RuntimeError):
    """The SVD did not converge or its input was not finite."""


def _compute_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def svd(matrix: torch.Tensor, *, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a 2-D tensor in float32 (float64 fallback). Returns ``U, S, Vh``."""
    if matrix.ndim != 2:
        raise ValueError(f"svd expects a 2-D tensor, got shape {tuple(matrix.shape)}")
    work = matrix.detach().to(_compute_dtype(matrix, dtype))
    if not torch.isfinite(work).all():
        raise SVDFailure("matrix has non-finite entries")
    try:
        return torch.linalg.svd(work, full_matrices=False)
    except RuntimeError:
        try:
            u, s, vh = torch.linalg.svd(work.double(), full_matrices=False)
        except RuntimeError as exc:
            raise SVDFailure(f"SVD did not converge in float32 nor float64: {exc}") from exc
        return u.to(work.dtype), s.to(work.dtype), vh.to(work.dtype)


def orthonormal_basis(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``matrix`` (reduced QR, sign-fixed)."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    niter: int = 4,
    oversample: int = 10,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD by randomized range finding with ``niter`` power iterations."""
    work = matrix.detach().to(_compute_dtype(matrix, dtype))
    if not torch.isfinite(work).all():
        raise SVDFailure("matrix has non-finite entries")
    m, n = work.shape
    sketch = min(rank + oversample, m, n)
    omega = torch.randn(n, sketch, generator=generator, device="cpu", dtype=work.dtype).to(work.device)
    basis = orthonormal_basis(work @ omega)
    for _ in range(niter):
        # Re-orthonormalise between multiplications so small singular directions survive.
        basis = orthonormal_basis(work.T @ basis)
        basis = orthonormal_basis(work @ basis)
    u_small, s, vh = svd(basis.T @ work, dtype=work.dtype)
    u = basis @ u_small
    return u[:, :rank], s[:rank], vh[:rank]


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    niter: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` triplets: exact thin SVD when ``niter`` is None, else randomized."""
    if niter is None:
        u, s, vh = svd(matrix, dtype=dtype)
        return u[:, :rank], s[:rank], vh[:rank]
    return randomized_svd(matrix, rank, niter=niter, generator=generator, dtype=dtype)
