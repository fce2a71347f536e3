"""Matrix norms from the singular values: spectral ``||W||_2 = sigma_1``, Frobenius
``||W||_F = sqrt(sum_k sigma_k^2)`` (Golub & Van Loan, "Matrix Computations", 4th ed., 2013,
section 2.3), the scales the rank measures are ratios of, and the nuclear (trace) norm
``||W||_* = sum_k sigma_k``, the convex envelope of the rank on the spectral-norm unit ball
(Fazel, "Matrix Rank Minimization with Applications", PhD thesis, Stanford, 2002).
"""

from __future__ import annotations

import torch

from rankwise.analyze.core import DIAGNOSTICS, Diagnostic
from rankwise.analyze.spectrum import MatrixLike, spectrum

_TEXTBOOK = "Matrix Computations (Golub & Van Loan, 4th ed., 2013), section 2.3"


def spectral_norm_of_spectrum(singular_values: torch.Tensor) -> float:
    """``sigma_1``, the largest singular value."""
    return float(singular_values.double().max())


def frobenius_norm_of_spectrum(singular_values: torch.Tensor) -> float:
    """``sqrt(sum sigma_k^2)``."""
    return float(singular_values.double().pow(2).sum().sqrt())


def nuclear_norm_of_spectrum(singular_values: torch.Tensor) -> float:
    """``sum sigma_k``."""
    return float(singular_values.double().sum())


def spectral_norm(matrix: MatrixLike) -> float:
    """``||W||_2`` of ``matrix`` (a 2-D tensor or a Linear-like / factorised layer)."""
    return spectral_norm_of_spectrum(spectrum(matrix))


def frobenius_norm(matrix: MatrixLike) -> float:
    """``||W||_F`` of ``matrix`` (a 2-D tensor or a Linear-like / factorised layer)."""
    return frobenius_norm_of_spectrum(spectrum(matrix))


def nuclear_norm(matrix: MatrixLike) -> float:
    """``||W||_* = sum_k sigma_k`` of ``matrix`` (a 2-D tensor or a Linear-like / factorised layer)."""
    return nuclear_norm_of_spectrum(spectrum(matrix))


@DIAGNOSTICS.register("spectral_norm", family="norm", paper=_TEXTBOOK)
class SpectralNorm(Diagnostic):
    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float:
        return spectral_norm_of_spectrum(singular_values)


@DIAGNOSTICS.register("frobenius_norm", family="norm", paper=_TEXTBOOK)
class FrobeniusNorm(Diagnostic):
    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float:
        return frobenius_norm_of_spectrum(singular_values)


@DIAGNOSTICS.register("nuclear_norm", family="norm",
                      paper="Matrix Rank Minimization with Applications (M. Fazel, PhD thesis, Stanford, 2002)")
class NuclearNorm(Diagnostic):
    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float:
        return nuclear_norm_of_spectrum(singular_values)
