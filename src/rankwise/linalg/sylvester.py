"""Sylvester equations with symmetric positive semi-definite coefficients.

:func:`solve_psd_sylvester` solves ``P X + X Q = C`` for symmetric PSD ``P`` (k x k) and
``Q`` (l x l) through their eigendecompositions ``P = U diag(lam) U^T``, ``Q = V diag(mu) V^T``:

    U^T (P X + X Q) V = diag(lam) Y + Y diag(mu),   Y = U^T X V
    =>  Y_ij = (U^T C V)_ij / (lam_i + mu_j),       X = U Y V^T.

Both spectra are >= 0, so the equation has a unique solution whenever ``lam_i + mu_j > 0``
for all ``i, j`` (the operator ``X -> P X + X Q`` is then positive definite). Pairs with
``lam_i + mu_j <= tol`` (``P`` and ``Q`` singular along a common direction pair) are set to
zero, which gives the minimum-norm least-squares solution: it is the pseudo-inverse of the
(symmetric PSD) Sylvester operator applied to ``C``. Symmetric eigendecompositions are real
and stable, unlike the general complex eigendecomposition a generic solver needs.

Computed in float32 (float64 for float64 input) on the input's device.
"""

from __future__ import annotations

import torch


def solve_psd_sylvester(
    p: torch.Tensor, q: torch.Tensor, c: torch.Tensor, *, tol: float | None = None
) -> torch.Tensor:
    """Minimum-norm ``X`` with ``P X + X Q = C`` (``P``, ``Q`` symmetric PSD); see module docstring.

    ``tol`` defaults to ``k * l * eps * max(lam_max + mu_max, tiny)`` of the compute dtype.
    """
    if p.ndim != 2 or q.ndim != 2 or p.shape[0] != p.shape[1] or q.shape[0] != q.shape[1]:
        raise ValueError(f"P and Q must be square matrices, got {tuple(p.shape)} and {tuple(q.shape)}")
    if tuple(c.shape) != (p.shape[0], q.shape[0]):
        raise ValueError(f"C must be {p.shape[0]} x {q.shape[0]}, got {tuple(c.shape)}")
    dtype = torch.float64 if c.dtype == torch.float64 else torch.float32
    lam, u = torch.linalg.eigh(p.to(dtype))
    mu, v = torch.linalg.eigh(q.to(dtype))
    # Rounding can leave tiny negative eigenvalues on a PSD matrix: they are zeros.
    lam, mu = lam.clamp_min(0), mu.clamp_min(0)
    denominator = lam[:, None] + mu[None, :]
    if tol is None:
        finfo = torch.finfo(dtype)
        scale = max(float(denominator.max()), finfo.tiny)
        tol = denominator.numel() * finfo.eps * scale
    rotated = u.T @ c.to(dtype) @ v
    solvable = denominator > tol
    y = torch.where(solvable, rotated / torch.where(solvable, denominator, 1.0), torch.zeros_like(rotated))
    return u @ y @ v.T
