"""Heavy-tail exponent of a weight matrix's eigenvalue spectrum, fitted as WeightWatcher does.

Papers: Martin & Mahoney, "Implicit Self-Regularization in Deep Neural Networks: Evidence
from Random Matrix Theory and Implications for Learning", arXiv 1810.01075 (the empirical
spectral density of trained layers is heavy-tailed; its power-law exponent alpha tracks
training quality: 2 <= alpha <= 6 for well-trained layers, alpha < 2 over-trained, large
alpha for weakly trained or random layers, alpha > 8 a spurious fit), fitted by the
maximum-likelihood / Kolmogorov-Smirnov procedure of Clauset, Shalizi & Newman,
"Power-law distributions in empirical data", arXiv 0706.1062.

The fit, on the eigenvalues ``lambda = sigma^2`` of ``W^T W`` (no normalisation: the
exponent does not depend on the scale), sorted ascending ``x_1 <= ... <= x_N``:

* for every candidate lower cut-off ``x_min = x_i`` (all but the largest) with the tail
  ``x_i .. x_N`` of ``n = N - i + 1`` values, the continuous power-law MLE
  ``alpha_i = 1 + n / sum_{j>=i} ln(x_j / x_i)``;
* its Kolmogorov-Smirnov distance ``D_i = max_{j>=i} |(1 - (x_j / x_i)^(1 - alpha_i)) - (j - i) / n|``
  between the fitted CDF and the empirical one (taken at the lower step of each jump, as
  WeightWatcher 0.7 does; candidates with ``alpha_i <= 1`` get ``D = 1``);
* the fit is the candidate of least ``D`` (the first on ties); its standard error is
  ``sigma = (alpha - 1) / sqrt(n)`` (Clauset et al., eq. 3.2).

``D`` is the fit's quality: the smaller, the closer the tail is to a power law.

Where this deviates from WeightWatcher 0.7.7 (``WeightWatcher.analyze()`` with default
settings, its own ``WW_powerlaw`` fitter): eigenvalues count as zero below
``lambda_max * (max(m, n) * eps_float32)^2`` (the float32 SVD's noise floor, relative to the
matrix's scale) instead of WeightWatcher's absolute ``1e-5``; and fewer than 20 non-zero
eigenvalues is refused (a RankwiseError; None in the report) where WeightWatcher switches to
an ad-hoc small-sample objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.analyze.core import DIAGNOSTICS, Diagnostic
from rankwise.analyze.spectrum import MatrixLike, as_matrix, spectrum
from rankwise.errors import RankwiseError

MIN_EIGENVALUES = 20
#: ranges of alpha and what they say (Martin & Mahoney; the bounds WeightWatcher reports by)
WELL_TRAINED = (2.0, 6.0)
SPURIOUS_ABOVE = 8.0
#: candidate rows of the KS-distance table computed at once (memory: rows x N float64)
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PowerLawFit:
    """A power-law fit ``p(lambda) ~ lambda^-alpha`` of the tail ``lambda >= xmin`` of the eigenvalues.

    ``float(fit)`` is ``alpha`` (the report's number); ``ks_distance`` is the fit's quality.
    """

    alpha: float
    xmin: float
    xmax: float
    ks_distance: float
    sigma: float
    tail_size: int
    num_eigenvalues: int

    def __float__(self) -> float:
        return self.alpha

    @property
    def verdict(self) -> str:
        """What alpha says, in Martin & Mahoney's terms."""
        if self.alpha < WELL_TRAINED[0]:
            return "over-trained (alpha < 2)"
        if self.alpha <= WELL_TRAINED[1]:
            return "well-trained (2 <= alpha <= 6)"
        if self.alpha <= SPURIOUS_ABOVE:
            return "weakly trained (6 < alpha <= 8)"
        return "no heavy tail / spurious fit (alpha > 8)"


def eigenvalues_of_spectrum(singular_values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The non-zero eigenvalues ``sigma^2`` of ``W^T W``, ascending, float64 (see the module docstring)."""
    eigenvalues = singular_values.double().pow(2).sort().values
    if eigenvalues.numel() == 0 or eigenvalues[-1] <= 0:
        return eigenvalues[:0]
    floor = eigenvalues[-1] * (max(shape) * torch.finfo(torch.float32).eps) ** 2
    return eigenvalues[eigenvalues > floor]


def fit_power_law(eigenvalues: torch.Tensor) -> PowerLawFit:
    """The Clauset-Shalizi-Newman fit of positive ``eigenvalues`` (any order), as in the module docstring."""
    x = eigenvalues.detach().double().flatten().sort().values
    count = x.numel()
    if count < MIN_EIGENVALUES or x[0] <= 0:
        raise RankwiseError(
            f"a power-law fit needs at least {MIN_EIGENVALUES} positive eigenvalues, got {int((x > 0).sum())}; "
            "pass a larger (or less rank-deficient) matrix"
        )
    log_x = x.log()
    suffix = log_x.flip(0).cumsum(0).flip(0)  # sum_{j >= i} ln x_j
    candidates = count - 1
    tail = torch.arange(count, 0, -1, dtype=torch.float64)[:candidates]  # n_i = N - i
    spread = suffix[:candidates] - tail * log_x[:candidates]
    alphas = 1.0 + tail / spread
    distances = torch.ones(candidates, dtype=torch.float64)
    column = torch.arange(count)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // count)
    for start in range(0, candidates, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, candidates))
        alpha = alphas[rows].unsqueeze(1)
        offset = column.unsqueeze(0) - rows.unsqueeze(1)  # j - i
        fitted = 1.0 - torch.exp((1.0 - alpha) * (log_x.unsqueeze(0) - log_x[rows].unsqueeze(1)))
        empirical = offset / tail[rows].unsqueeze(1)
        gap = torch.where(offset >= 0, (fitted - empirical).abs(), torch.zeros((), dtype=torch.float64))
        valid = torch.isfinite(alphas[rows]) & (alphas[rows] > 1.0)
        distances[rows] = torch.where(valid, gap.max(dim=1).values, distances[rows])
    best = int(torch.argmin(distances))
    alpha = float(alphas[best])
    return PowerLawFit(
        alpha=alpha,
        xmin=float(x[best]),
        xmax=float(x[-1]),
        ks_distance=float(distances[best]),
        sigma=(alpha - 1.0) / math.sqrt(float(tail[best])),
        tail_size=int(tail[best]),
        num_eigenvalues=count,
    )


def power_law_alpha(matrix: MatrixLike) -> PowerLawFit:
    """Power-law fit of the eigenvalues of ``W^T W`` (``W`` a 2-D tensor or a Linear-like /
    factorised layer): ``alpha``, ``xmin``, the KS distance (quality), ``sigma``, the tail size."""
    weight = as_matrix(matrix)
    return fit_power_law(eigenvalues_of_spectrum(spectrum(weight), tuple(weight.shape)))


@DIAGNOSTICS.register(
    "power_law_alpha",
    family="heavy_tail",
    paper="Implicit Self-Regularization in Deep Neural Networks: Evidence from Random Matrix Theory and "
          "Implications for Learning",
    arxiv="1810.01075",
)
class PowerLawAlpha(Diagnostic):
    """alpha of the power-law fit; None when the matrix has fewer than 20 non-zero eigenvalues."""

    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float | None:
        eigenvalues = eigenvalues_of_spectrum(singular_values, tuple(matrix.shape))
        if eigenvalues.numel() < MIN_EIGENVALUES:
            return None
        return fit_power_law(eigenvalues).alpha
