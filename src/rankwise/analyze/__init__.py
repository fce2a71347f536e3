"""Spectral diagnostics of weight matrices and models.

One module per diagnostic, each registered in ``DIAGNOSTICS`` (:mod:`rankwise.analyze.core`
says how to add one): :mod:`~rankwise.analyze.rankme` (RankMe effective rank),
:mod:`~rankwise.analyze.numerical_rank` (stable rank), :mod:`~rankwise.analyze.norms`
(spectral and Frobenius norms); :mod:`~rankwise.analyze.spectrum` (singular values) and
:mod:`~rankwise.analyze.report` (``model_report``: every registered diagnostic per layer).
"""

from rankwise.analyze.core import DIAGNOSTICS, Diagnostic, method_options
from rankwise.analyze.norms import frobenius_norm, spectral_norm
from rankwise.analyze.numerical_rank import stable_rank, stable_rank_of_spectrum
from rankwise.analyze.rankme import effective_rank, effective_rank_of_spectrum
from rankwise.analyze.report import model_report
from rankwise.analyze.spectrum import spectrum

__all__ = [
    "DIAGNOSTICS",
    "Diagnostic",
    "effective_rank",
    "effective_rank_of_spectrum",
    "frobenius_norm",
    "method_options",
    "model_report",
    "spectral_norm",
    "spectrum",
    "stable_rank",
    "stable_rank_of_spectrum",
]
