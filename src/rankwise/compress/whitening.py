"""Weighted truncated SVD: the shared core of the data-aware factorisations (family module).

Each data-aware method minimises a weighted error of the rank-``k`` replacement ``W'`` of an
``m x n`` weight ``W``:

    || L (W - W') S ||_F,     L = diag(l) (m x m, rows),   S (n x n, columns),

whose minimiser (Eckart-Young on the weighted matrix) is: SVD of ``M = L W S = U Sigma V^T``,
keep ``k`` triplets, undo the weights:

    up   = L^{-1} U_k Sigma_k^{1/2}                  (m x k)
    down = Sigma_k^{1/2} V_k^T S^{-1}                (k x n)

and the weighted error equals ``sqrt(sum_{i>k} sigma_i^2)`` of ``M``. The column weight ``S``
is a :class:`Whitening`: any square root of a Gram matrix ``C = S S^T``, for which
``||(W - W') S||_F^2 = tr((W - W') C (W - W')^T)`` is the output error on the inputs whose
Gram matrix ``C`` is (SVD-LLM, EoRA, MoDeGPT's V-O), or a diagonal (ASVD's channel scales).

:meth:`Whitening.cholesky` is SVD-LLM's (arXiv 2403.07378): ``C = S S^T`` by Cholesky in
float64; when ``C`` is not numerically positive definite (a pivot^2 below 1e-12 of the mean
diagonal: duplicate or dead input channels, fewer tokens than channels) it adds ``(-lambda_min + eps) I`` and retries,
``eps = 1e-6`` relative to ``C``'s mean diagonal (the release adds an absolute 1e-6, which
does nothing for a Gram matrix of size 1e6 and too much for one of size 1e-6), growing it
tenfold until the factor exists. ``S^{-1}`` is applied by triangular solves, never formed.
:meth:`Whitening.eigen` is SVD-LLM v2's loss-optimised truncation (arXiv 2503.12340, "two
rounds of SVD": of ``C`` then of ``W S``) and EoRA's eigenspace projection (arXiv 2410.21271):
``C = Q Lambda Q^T``, ``S = Q Lambda^{1/2}``, eigenvalues below the largest times 1e-12 raised
to the smallest positive one kept (EoRA clamps negative ones to the smallest positive).
Everything is computed in float64 on the weight's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.errors import RankwiseError

#: relative jitter added to a Gram matrix that is not positive definite (times its mean diagonal)
JITTER = 1e-6
#: a Cholesky pivot whose square is below this times C's mean diagonal counts as a failure
PIVOT_FLOOR = 1e-12
#: eigenvalues are floored at this fraction of the largest
EIGEN_FLOOR = 1e-12


@dataclass(frozen=True)
class Whitening:
    """A column weight ``S`` (``n x n``, float64): triangular (Cholesky), general (eigen) or diagonal."""

    root: torch.Tensor  # S, or its diagonal (n,) when ``form == "diagonal"``
    form: str  # "triangular" | "general" | "diagonal"
    inverse: torch.Tensor | None = None  # S^{-1} for the general form
    jitter: float = 0.0  # what was added to C's diagonal, in C's units

    @classmethod
    def cholesky(cls, gram: torch.Tensor) -> "Whitening":
        """``C = S S^T`` with ``S`` lower triangular (SVD-LLM), jittered when ``C`` is not positive definite."""
        gram = _symmetric64(gram)
        scale = float(torch.diagonal(gram).mean().clamp_min(torch.finfo(torch.float64).tiny))

        def factorised(matrix: torch.Tensor) -> torch.Tensor | None:
            factor, info = torch.linalg.cholesky_ex(matrix)
            # a pivot this small is a numerically singular C: its inverse would amplify rounding
            usable = int(info) == 0 and float(torch.diagonal(factor).min()) ** 2 > PIVOT_FLOOR * scale
            return factor if usable else None

        factor = factorised(gram)
        if factor is not None:
            return cls(factor, "triangular")
        lowest = float(torch.linalg.eigvalsh(gram)[0])
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        eps = JITTER
        for _ in range(8):
            jitter = max(-lowest, 0.0) + eps * scale
            factor = factorised(gram + jitter * eye)
            if factor is not None:
                return cls(factor, "triangular", jitter=jitter)
            eps *= 10
        raise RankwiseError("the input Gram matrix has no Cholesky factor even with jitter; it is not finite "
                            "or the calibration rows are degenerate: pass more (and more varied) calibration data")

    @classmethod
    def eigen(cls, gram: torch.Tensor) -> "Whitening":
        """``C = Q Lambda Q^T``, ``S = Q Lambda^{1/2}`` (SVD-LLM v2, EoRA), eigenvalues floored at 1e-12 of the largest."""
        gram = _symmetric64(gram)
        values, vectors = torch.linalg.eigh(gram)
        top = float(values.max())
        if not top > 0:
            raise RankwiseError("the input Gram matrix is zero: the layer saw only zero inputs in the calibration data")
        values = values.clamp_min(EIGEN_FLOOR * top)
        root = vectors * values.sqrt()
        inverse = (vectors / values.sqrt()).T
        return cls(root, "general", inverse)

    @classmethod
    def diagonal(cls, scales: torch.Tensor) -> "Whitening":
        """``S = diag(scales)``; scales must be positive."""
        scales = scales.detach().to(torch.float64)
        if not bool((scales > 0).all()) or not bool(torch.isfinite(scales).all()):
            raise RankwiseError("column scales must be finite and positive")
        return cls(scales, "diagonal")

    def whiten(self, weight: torch.Tensor) -> torch.Tensor:
        """``W S``."""
        root = self.root.to(weight.device)
        return weight * root if self.form == "diagonal" else weight @ root

    def unwhiten(self, rows: torch.Tensor) -> torch.Tensor:
        """``Y S^{-1}`` (by triangular solves for the Cholesky form)."""
        root = self.root.to(rows.device)
        if self.form == "diagonal":
            return rows / root
        if self.form == "general":
            return rows @ self.inverse.to(rows.device)
        # Y S^{-1} = Z  <=>  S^T Z^T = Y^T, with S^T upper triangular
        return torch.linalg.solve_triangular(root.T, rows.T, upper=True).T

    def gram(self) -> torch.Tensor:
        """``S S^T`` (the Gram matrix the error is measured under, jitter included)."""
        if self.form == "diagonal":
            return torch.diag(self.root.square())
        return self.root @ self.root.T


def _symmetric64(gram: torch.Tensor) -> torch.Tensor:
    gram = gram.detach().to(torch.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square Gram matrix, got shape {tuple(gram.shape)}")
    if not bool(torch.isfinite(gram).all()):
        raise RankwiseError("the input Gram matrix is not finite: the calibration activations overflowed")
    return (gram + gram.T) / 2


def weighted_truncation(
    weight: torch.Tensor, rank: int, *, rows: torch.Tensor | None = None, columns: Whitening | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(up, down, sigma)``: the rank-``rank`` minimiser of ``||diag(rows) (W - up down) S||_F`` (float64)
    and all singular values ``sigma`` of the weighted matrix (the discarded ones give the error)."""
    work = weight.detach().to(torch.float64)
    if rows is not None:
        rows = rows.detach().to(device=work.device, dtype=torch.float64)
        work = work * rows[:, None]
    if columns is not None:
        work = columns.whiten(work)
    u, sigma, vh = torch.linalg.svd(work, full_matrices=False)
    root = sigma[:rank].clamp_min(0).sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if rows is not None:
        up = up / rows[:, None]
    if columns is not None:
        down = columns.unwhiten(down)
    return up, down, sigma


def gram_of(stats_covariance) -> torch.Tensor:
    """The float64 Gram matrix ``sum_t x_t x_t^T`` of a :class:`~rankwise.linalg.covariance.CovarianceAccumulator`,
    refusing a layer that saw no rows."""
    if stats_covariance is None or stats_covariance.count == 0:
        raise RankwiseError("a targeted layer saw no calibration rows (its forward never ran on the data); "
                            "leave it out of targets or pass data that reaches it")
    return stats_covariance.gram.to(torch.float64)
