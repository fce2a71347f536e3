"""Per-layer spectral summary of a model (one row per targeted Linear layer).

``model_report(model, targets)`` returns, in module order, for each selected ``nn.Linear``
(and each whole :class:`~rankwise.nn.FactorizedLinear`, reported through its dense product)
a dict with ``name``, ``shape`` (out, in), ``rank`` (the factorised rank, or min(out, in)
for a dense layer), ``effective_rank``, ``stable_rank``, ``spectral_norm`` (sigma_1) and
``frobenius_norm``. The CLI prints it as a table.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rankwise.analyze.ranks import effective_rank_of_spectrum, stable_rank_of_spectrum
from rankwise.analyze.spectrum import as_matrix, spectrum
from rankwise.nn import FactorizedLinear, select_linear_layers
from rankwise.targets import Targets


def model_report(model: nn.Module, targets: Targets = "all-linear") -> list[dict[str, Any]]:
    """Spectral diagnostics of every layer ``targets`` selects (RankwiseError if none)."""
    rows = []
    for name in select_linear_layers(model, targets, include_factorized=True):
        layer = model.get_submodule(name)
        weight = as_matrix(layer)
        singular_values = spectrum(weight)
        rows.append(
            {
                "name": name,
                "shape": tuple(weight.shape),
                "rank": layer.rank if isinstance(layer, FactorizedLinear) else min(weight.shape),
                "effective_rank": effective_rank_of_spectrum(singular_values),
                "stable_rank": stable_rank_of_spectrum(singular_values),
                "spectral_norm": float(singular_values[0]),
                "frobenius_norm": float(singular_values.double().pow(2).sum().sqrt()),
            }
        )
    return rows
