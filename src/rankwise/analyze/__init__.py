"""Spectral diagnostics of weight matrices and models.

One module per diagnostic: :mod:`~rankwise.analyze.spectrum` (singular values),
:mod:`~rankwise.analyze.ranks` (RankMe effective rank, stable rank),
:mod:`~rankwise.analyze.report` (per-layer table for a model).
"""

from rankwise.analyze.ranks import effective_rank, effective_rank_of_spectrum, stable_rank, stable_rank_of_spectrum
from rankwise.analyze.report import model_report
from rankwise.analyze.spectrum import spectrum

__all__ = [
    "effective_rank",
    "effective_rank_of_spectrum",
    "model_report",
    "spectrum",
    "stable_rank",
    "stable_rank_of_spectrum",
]
