"""FWSVD: Fisher-weighted SVD.

Paper: Hsu et al., "Language model compression with weighted low-rank factorization",
arXiv 2207.00112. Rows of the weight whose errors move the task loss more are approximated
more closely. With the empirical Fisher information of each weight entry, summed per row,

    I_i = sum_j E_b[(dL_b / dW_ij)^2],     L = diag(sqrt(I)),
    L W = U Sigma V^T,   up = L^{-1} U_k Sigma_k^{1/2},   down = Sigma_k^{1/2} V_k^T,

the rank-``k`` minimiser of ``sum_i I_i ||w_i - w'_i||^2`` (:mod:`rankwise.compress.whitening`).
``L_b`` is each calibration batch's loss: the model's own (batches with labels) or
``compress(..., loss_fn=...)`` for a model without one.

Deviations: the expectation is over calibration *batches* (each batch's gradient squared),
not over single samples as in the paper -- pass batches of one sequence for the per-sample
estimate; a row with zero Fisher information gets the smallest positive one of the layer
(it would otherwise make ``L`` singular).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.calibration import LayerStatistics
from rankwise.compress.core import COMPRESSORS, Compressor
from rankwise.compress.whitening import weighted_truncation
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight


def row_weights(fisher: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum_j I_ij)`` per row (float64), zero rows raised to the smallest positive one."""
    rows = fisher.to(torch.float64).sum(dim=1)
    positive = rows[rows > 0]
    if positive.numel() == 0:
        raise RankwiseError("a targeted layer got no gradient from the calibration loss (all Fisher information "
                            "is zero); check that the loss depends on it, or leave it out of targets")
    return rows.clamp_min(float(positive.min())).sqrt()


@COMPRESSORS.register(
    "fwsvd",
    family="svd",
    paper="Language model compression with weighted low-rank factorization",
    arxiv="2207.00112",
    needs_data=True,
)
class FWSVDCompressor(Compressor):
    """Truncated SVD of ``diag(sqrt(row Fisher)) W``, the weighting undone on the left factor."""

    calibration = ("weight_fisher",)

    def factorize(
        self, name: str, layer: nn.Module, rank: int, stats: LayerStatistics | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        up, down, _ = weighted_truncation(dense_weight(layer), rank, rows=row_weights(stats.extra["weight_fisher"]))
        return up, down
