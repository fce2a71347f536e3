"""ASVD: activation-aware SVD.

Paper: Yuan et al., "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
Language Models", arXiv 2312.05821. Input channels that carry large activations matter more
to the output, so the weight is scaled by them before the SVD. With ``a_j = mean_t |x_tj|``
the mean absolute input of channel ``j`` over the calibration tokens,

    S = diag(a)^alpha,   W S = U Sigma V^T,
    up = U_k Sigma_k^{1/2},   down = Sigma_k^{1/2} V_k^T S^{-1},

the rank-``k`` minimiser of ``||(W - up down) S||_F`` (:mod:`rankwise.compress.whitening`).
Option ``alpha`` (default 0.5, the release's default; 0 gives plain SVD).

Deviations from the release (hahnyuan/ASVD4LLM): the SVD is exact (the release uses
``torch.svd_lowrank`` with ``q = rank`` and no power iterations); a dead channel (``a_j = 0``)
gets the smallest positive scale of the layer instead of the release's additive 1e-6 (which
depends on the activations' units); ranks come from the allocation (the release's
sensitivity-based truncation-rank search corresponds to ``allocation="sensitivity"``).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.calibration import LayerStatistics
from rankwise.compress.core import COMPRESSORS, Compressor
from rankwise.compress.whitening import Whitening, weighted_truncation
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight
from rankwise.options import Option


def activation_scales(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``a^alpha`` with dead channels raised to the smallest positive ``a`` (float64)."""
    abs_mean = abs_mean.to(torch.float64)
    positive = abs_mean[abs_mean > 0]
    if positive.numel() == 0:
        raise RankwiseError("every input channel of a targeted layer was zero on the calibration data; "
                            "pass data that reaches it or leave it out of targets")
    return abs_mean.clamp_min(float(positive.min())) ** alpha


@COMPRESSORS.register(
    "asvd",
    family="svd",
    paper="ASVD: Activation-aware Singular Value Decomposition for Compressing Large Language Models",
    arxiv="2312.05821",
    needs_data=True,
)
class ASVDCompressor(Compressor):
    """Truncated SVD of ``W diag(mean |x|)^alpha``, the scaling undone on the right factor."""

    OPTIONS = {"alpha": Option(0.5, float, low=0, help="exponent of the activation scaling diag(mean |x|)^alpha")}
    calibration = ("input_abs_mean",)

    def factorize(
        self, name: str, layer: nn.Module, rank: int, stats: LayerStatistics | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scales = Whitening.diagonal(activation_scales(stats.extra["input_abs_mean"], self.options["alpha"]))
        up, down, _ = weighted_truncation(dense_weight(layer), rank, columns=scales)
        return up, down
