"""Stable (numerical) rank: ``||W||_F^2 / ||W||_2^2 = sum_k sigma_k^2 / sigma_1^2``.

Paper: Rudelson & Vershynin, "Sampling from large matrices: an approach through geometric
functional analysis", J. ACM 54(4), 2007 (arXiv math/0503442), where it bounds the sample
size of matrix approximation. It lies between 1 and rank(W) and is insensitive to tiny
singular values. Undefined (a RankwiseError) for an all-zero matrix.
"""

from __future__ import annotations

import torch

from rankwise.analyze.core import DIAGNOSTICS, Diagnostic
from rankwise.analyze.spectrum import MatrixLike, nonzero_spectrum, spectrum


def stable_rank_of_spectrum(singular_values: torch.Tensor) -> float:
    """``sum sigma^2 / max sigma^2`` of singular values already computed."""
    singular_values = nonzero_spectrum(singular_values, "stable rank")
    return float((singular_values**2).sum() / singular_values.max() ** 2)


def stable_rank(matrix: MatrixLike) -> float:
    """``||W||_F^2 / ||W||_2^2`` of ``matrix`` (a 2-D tensor or a Linear-like / factorised layer)."""
    return stable_rank_of_spectrum(spectrum(matrix))


@DIAGNOSTICS.register(
    "stable_rank",
    family="rank",
    paper="Sampling from large matrices: an approach through geometric functional analysis (J. ACM 2007, "
          "arXiv math/0503442)",
)
class StableRank(Diagnostic):
    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float:
        return stable_rank_of_spectrum(singular_values)
