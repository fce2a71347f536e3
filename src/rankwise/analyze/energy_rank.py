"""Energy rank: how many singular directions hold a given share of a matrix's energy.

``energy_rank(W, share) = min { k : sum_{i<=k} sigma_i^2 >= share * sum_i sigma_i^2 }``

By Eckart-Young (Eckart & Young, "The approximation of one matrix by another of lower rank",
Psychometrika 1(3), 1936) the best rank-k approximation keeps exactly the top-k ``sigma^2``,
so this is the smallest rank whose best approximation has relative squared error at most
``1 - share`` (the explained-variance criterion of PCA). ``share = 1`` gives the rank, 0 is
refused. Undefined (a RankwiseError) for an all-zero matrix.
"""

from __future__ import annotations

import torch

from rankwise.analyze.core import DIAGNOSTICS, Diagnostic
from rankwise.analyze.spectrum import MatrixLike, nonzero_spectrum, spectrum
from rankwise.options import Option

SHARE = Option(0.9, float, low=0.0, high=1.0, low_open=True,
               help="share of sum sigma^2 the kept directions must hold, in (0, 1]")


def energy_rank_of_spectrum(singular_values: torch.Tensor, share: float = 0.9) -> int:
    """Smallest ``k`` whose top-k ``sigma^2`` sum to at least ``share`` of the total."""
    share = SHARE.check("share", share, owner="energy_rank")
    energy = nonzero_spectrum(singular_values, "energy rank").sort(descending=True).values.pow(2)
    cumulative = energy.cumsum(0) / energy.sum()
    # relative rounding of the cumulative sum: share = 1 must reach the last non-zero value
    reached = cumulative >= share - 8 * torch.finfo(torch.float64).eps * len(energy)
    return int(reached.nonzero()[0]) + 1


def energy_rank(matrix: MatrixLike, share: float = 0.9) -> int:
    """Rank needed for ``share`` of ``||W||_F^2`` (see the module docstring)."""
    return energy_rank_of_spectrum(spectrum(matrix), share)


@DIAGNOSTICS.register(
    "energy_rank",
    family="rank",
    paper="The approximation of one matrix by another of lower rank (Eckart & Young, Psychometrika 1936)",
)
class EnergyRank(Diagnostic):
    OPTIONS = {"share": SHARE}

    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float:
        return float(energy_rank_of_spectrum(singular_values, self.options["share"]))
