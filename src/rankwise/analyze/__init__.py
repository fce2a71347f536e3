"""Spectral diagnostics of weight matrices, fine-tuning updates, gradients and representations.

One module per diagnostic; the scalar ones are registered in ``DIAGNOSTICS``
(:mod:`rankwise.analyze.core` says how to add one):

- per matrix (:func:`model_report` columns): :mod:`~rankwise.analyze.rankme` (RankMe
  effective rank), :mod:`~rankwise.analyze.numerical_rank` (stable rank),
  :mod:`~rankwise.analyze.energy_rank` (rank for a share of the energy),
  :mod:`~rankwise.analyze.norms` (spectral, Frobenius, nuclear norms),
  :mod:`~rankwise.analyze.heavy_tail` (WeightWatcher's power-law alpha);
- per update (:func:`update_report` columns): :mod:`~rankwise.analyze.intruders`
  (intruder dimensions and their mitigation); :mod:`~rankwise.analyze.updates`
  (update spectra, principal angles between updates);
- artificial entanglement: :mod:`~rankwise.analyze.entanglement` (profiles of matrices and
  MPS, volume / area / log laws; MPS math in :mod:`~rankwise.analyze.tensor_network`),
  :mod:`~rankwise.analyze.attention` (attention matrices on text);
- along training: :mod:`~rankwise.analyze.gradient_rank` (``GradientRankCallback``; imported
  on first use, as it subclasses transformers' ``TrainerCallback``, whose import pulls in the
  Trainer's dependencies);
- representations: :mod:`~rankwise.analyze.representations` (Matrix Nuclear-Norm);
- by training runs: :mod:`~rankwise.analyze.intrinsic_dimension` (``d90`` from a sweep of
  subspace fine-tuning runs with the ``said`` adapter);
- :mod:`~rankwise.analyze.spectrum` (singular values), :mod:`~rankwise.analyze.report`
  (the per-layer tables).
"""

from rankwise.analyze.attention import attention_entanglement, attention_matrices, attention_matrix
from rankwise.analyze.core import (
    DIAGNOSTICS,
    Diagnostic,
    TrainingDiagnostic,
    UpdateDiagnostic,
    matrix_diagnostics,
    method_options,
    training_diagnostics,
    update_diagnostics,
)
from rankwise.analyze.energy_rank import energy_rank, energy_rank_of_spectrum
from rankwise.analyze.entanglement import (
    EntanglementLawFit,
    EntanglementProfile,
    entanglement_profile,
    fit_entanglement_law,
)
from rankwise.analyze.heavy_tail import PowerLawFit, fit_power_law, power_law_alpha
from rankwise.analyze.intrinsic_dimension import IntrinsicDimension, intrinsic_dimension
from rankwise.analyze.intruders import Intruders, intruder_dimensions, mitigate_intruders
from rankwise.analyze.norms import frobenius_norm, nuclear_norm, spectral_norm
from rankwise.analyze.numerical_rank import stable_rank, stable_rank_of_spectrum
from rankwise.analyze.rankme import effective_rank, effective_rank_of_spectrum
from rankwise.analyze.report import model_report, update_report
from rankwise.analyze.representations import MatrixNuclearNorm, matrix_nuclear_norm
from rankwise.analyze.spectrum import spectrum
from rankwise.analyze.updates import SubspaceOverlap, subspace_overlap, update_spectrum

__all__ = [
    "DIAGNOSTICS",
    "Diagnostic",
    "EntanglementLawFit",
    "EntanglementProfile",
    "GradientRankCallback",
    "IntrinsicDimension",
    "Intruders",
    "MatrixNuclearNorm",
    "PowerLawFit",
    "SubspaceOverlap",
    "TrainingDiagnostic",
    "UpdateDiagnostic",
    "attention_entanglement",
    "attention_matrices",
    "attention_matrix",
    "effective_rank",
    "effective_rank_of_spectrum",
    "energy_rank",
    "energy_rank_of_spectrum",
    "entanglement_profile",
    "fit_entanglement_law",
    "fit_power_law",
    "frobenius_norm",
    "intrinsic_dimension",
    "intruder_dimensions",
    "matrix_diagnostics",
    "matrix_nuclear_norm",
    "method_options",
    "mitigate_intruders",
    "model_report",
    "nuclear_norm",
    "power_law_alpha",
    "spectral_norm",
    "spectrum",
    "stable_rank",
    "stable_rank_of_spectrum",
    "subspace_overlap",
    "training_diagnostics",
    "update_diagnostics",
    "update_report",
    "update_spectrum",
]


def __getattr__(name: str):
    if name == "GradientRankCallback":
        from rankwise.analyze.gradient_rank import GradientRankCallback

        return GradientRankCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
