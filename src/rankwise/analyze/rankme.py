"""Effective rank, RankMe form: how many directions a matrix really uses, from the entropy of its spectrum.

Paper: Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the Downstream Performance
of Pretrained Self-Supervised Representations by Their Rank", arXiv 2210.02885 (the
entropy-of-singular-values rank of Roy & Vetterli 2007, with RankMe's epsilon):

    p_k = sigma_k / ||sigma||_1 + eps,   eps = 1e-7,
    effective_rank = exp(-sum_k p_k log p_k).

It equals n for n equal singular values (up to the ``eps`` term, O(n eps)) and ~1 for a
rank-1 matrix (the zero singular values contribute ``-eps log eps`` each). Undefined (a
RankwiseError) for an all-zero matrix.
"""

from __future__ import annotations

import torch

from rankwise.analyze.core import DIAGNOSTICS, Diagnostic
from rankwise.analyze.spectrum import MatrixLike, nonzero_spectrum, spectrum

RANKME_EPS = 1e-7


def effective_rank_of_spectrum(singular_values: torch.Tensor) -> float:
    """RankMe ``exp(-sum p log p)``, ``p = sigma / sum sigma + 1e-7``, of singular values already computed."""
    singular_values = nonzero_spectrum(singular_values, "effective rank")
    p = singular_values / singular_values.sum() + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(matrix: MatrixLike) -> float:
    """RankMe effective rank of ``matrix`` (a 2-D tensor or a Linear-like / factorised layer)."""
    return effective_rank_of_spectrum(spectrum(matrix))


@DIAGNOSTICS.register(
    "effective_rank",
    family="rank",
    paper="RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised Representations by Their Rank",
    arxiv="2210.02885",
)
class EffectiveRank(Diagnostic):
    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float:
        return effective_rank_of_spectrum(singular_values)
