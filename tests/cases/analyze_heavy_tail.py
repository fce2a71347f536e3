"""Known answers of the power-law (heavy-tail) fit on matrices with constructed eigenvalue spectra."""

import math

import torch

from cases.analyze_ranks_norms import with_spectrum
from cases.row_types import DiagnosticCase


def clauset_alpha(eigenvalues: list[float]) -> float:
    """Clauset-Shalizi-Newman, in plain Python floats: for each candidate xmin x_i (all but the
    largest), alpha_i = 1 + n / sum ln(x_j / x_i) over the n values x_j >= x_i, and the KS distance
    max |1 - (x_j / x_i)^(1 - alpha_i) - (j - i) / n|; the alpha of least distance (first on ties)."""
    x = sorted(eigenvalues)
    best_distance, best_alpha = math.inf, math.nan
    for i in range(len(x) - 1):
        n = len(x) - i
        alpha = 1 + n / sum(math.log(v / x[i]) for v in x[i:])
        distance = max(abs(1 - (x[j] / x[i]) ** (1 - alpha) - (j - i) / n) for j in range(i, len(x)))
        if distance < best_distance:
            best_distance, best_alpha = distance, alpha
    return best_alpha


def pareto_quantiles(alpha: float, count: int) -> list[float]:
    """The ``count`` mid-quantiles of the density ~ lambda^-alpha on [1, inf): (1 - F)^(-1 / (alpha - 1))."""
    return [((count - k - 0.5) / count) ** (-1 / (alpha - 1)) for k in range(count)]


def with_eigenvalues(eigenvalues: list[float], out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A float64 matrix whose W^T W has these non-zero eigenvalues (singular values sqrt(lambda))."""
    return with_spectrum(sorted((math.sqrt(e) for e in eigenvalues), reverse=True), out_features, in_features, seed)


POWER_3 = pareto_quantiles(3.0, 64)
POWER_2_5 = pareto_quantiles(2.5, 120)
# a light tail: eigenvalues spread evenly on [1, 2] (no power law; the fit settles near the top)
UNIFORM = [1 + k / 49 for k in range(50)]

CASES = [
    # the spectrum passes through a float32 SVD (1e-7 relative) before the fit, hence rel=1e-4
    DiagnosticCase("power_law_alpha/pareto-3", "power_law_alpha", lambda: with_eigenvalues(POWER_3, 64, 64),
                   clauset_alpha(POWER_3), rel=1e-4),
    DiagnosticCase("power_law_alpha/pareto-2.5-rectangular", "power_law_alpha",
                   lambda: with_eigenvalues(POWER_2_5, 200, 120, seed=3), clauset_alpha(POWER_2_5), rel=1e-4),
    DiagnosticCase("power_law_alpha/uniform", "power_law_alpha", lambda: with_eigenvalues(UNIFORM, 50, 80, seed=5),
                   clauset_alpha(UNIFORM), rel=1e-4),
]
