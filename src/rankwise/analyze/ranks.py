"""Scalar measures of how many directions a matrix really uses.

- Effective rank, RankMe form (Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the
  Downstream Performance of Pretrained Self-Supervised Representations by Their Rank",
  arXiv 2210.02885; the entropy-of-singular-values rank of Roy & Vetterli 2007):

      p_k = sigma_k / ||sigma||_1 + eps,   eps = 1e-7,
      effective_rank = exp(-sum_k p_k log p_k).

  It equals n for n equal singular values (up to the ``eps`` term, O(n eps)) and ~1 for a
  rank-1 matrix (the zero singular values contribute ``-eps log eps`` each).
- Stable (numerical) rank: ``||W||_F^2 / ||W||_2^2 = sum_k sigma_k^2 / sigma_1^2``, between
  1 and rank(W), insensitive to tiny singular values.

Both accept a tensor, an ``nn.Linear`` or a ``FactorizedLinear`` and raise RankwiseError
for an all-zero matrix, for which neither is defined. The ``*_of_spectrum`` forms take
singular values already computed (one SVD for several diagnostics).
"""

from __future__ import annotations

import torch

from rankwise.analyze.spectrum import MatrixLike, spectrum
from rankwise.errors import RankwiseError

RANKME_EPS = 1e-7


def _checked(singular_values: torch.Tensor, what: str) -> torch.Tensor:
    singular_values = singular_values.double()
    if singular_values.numel() == 0 or singular_values.max() <= 0:
        raise RankwiseError(f"the {what} of an all-zero matrix is undefined; pass a non-zero matrix")
    return singular_values


def effective_rank_of_spectrum(singular_values: torch.Tensor) -> float:
    """RankMe ``exp(-sum p log p)``, ``p = sigma / sum sigma + 1e-7``."""
    singular_values = _checked(singular_values, "effective rank")
    p = singular_values / singular_values.sum() + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank_of_spectrum(singular_values: torch.Tensor) -> float:
    """``sum sigma^2 / max sigma^2``."""
    singular_values = _checked(singular_values, "stable rank")
    return float((singular_values**2).sum() / singular_values.max() ** 2)


def effective_rank(matrix: MatrixLike) -> float:
    """RankMe effective rank of ``matrix``."""
    return effective_rank_of_spectrum(spectrum(matrix))


def stable_rank(matrix: MatrixLike) -> float:
    """``||W||_F^2 / ||W||_2^2`` of ``matrix``."""
    return stable_rank_of_spectrum(spectrum(matrix))
