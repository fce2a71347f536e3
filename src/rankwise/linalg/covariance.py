"""Streaming second-order statistics of activations.

:class:`CovarianceAccumulator` consumes row blocks ``X_b`` (``n_b x d``, one row per token)
and keeps, in a float32-or-wider accumulator on the rows' device,

    count  = sum_b n_b
    total  = sum_b 1^T X_b                (d,)
    gram   = sum_b X_b^T X_b              (d x d)   -- the uncentred ``X^T X`` of CorDA

from which

    mean           = total / count
    second_moment  = gram / count                       (E[x x^T])
    covariance     = second_moment - mean mean^T        (population covariance)

Accumulating in float32 (float64 when asked) whatever the activation dtype keeps bf16
models from losing the small eigen-directions that data-driven inits rely on.
"""

from __future__ import annotations

import torch


class CovarianceAccumulator:
    """Running ``count``, column sums and Gram matrix ``X^T X`` of a stream of row blocks."""

    def __init__(self, dim: int, *, dtype: torch.dtype = torch.float32) -> None:
        self.dim = dim
        self.dtype = dtype
        self.count = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        """Add a block of rows (any leading shape; last dimension ``dim``)."""
        if rows.shape[-1] != self.dim:
            raise ValueError(f"expected rows with last dimension {self.dim}, got shape {tuple(rows.shape)}")
        block = rows.detach().reshape(-1, self.dim).to(self.dtype)
        if self.gram is None:
            self.total = torch.zeros(self.dim, dtype=self.dtype, device=block.device)
            self.gram = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=block.device)
        self.count += block.shape[0]
        self.total += block.sum(dim=0)
        self.gram += block.T @ block

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("no rows were accumulated")

    def mean(self) -> torch.Tensor:
        """``E[x]`` (d,)."""
        self._require_data()
        return self.total / self.count

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T] = X^T X / n`` (d x d)."""
        self._require_data()
        return self.gram / self.count

    def covariance(self) -> torch.Tensor:
        """Population covariance ``E[x x^T] - E[x] E[x]^T`` (d x d)."""
        mean = self.mean()
        return self.second_moment() - torch.outer(mean, mean)
