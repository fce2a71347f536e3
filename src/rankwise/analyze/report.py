"""Per-layer spectral summary of a model (one row per targeted Linear layer).

``model_report(model, targets)`` returns, in module order, for each selected ``nn.Linear``
(and each whole :class:`~rankwise.nn.FactorizedLinear`, reported through its dense product)
a dict with ``name``, ``shape`` (out, in), ``rank`` (the factorised rank, or min(out, in)
for a dense layer) and one column per registered diagnostic (``DIAGNOSTICS``: today
``effective_rank``, ``stable_rank``, ``spectral_norm``, ``frobenius_norm``), all computed
from one SVD of the layer's weight.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from rankwise.analyze.core import DIAGNOSTICS
from rankwise.analyze.spectrum import as_matrix, spectrum
from rankwise.nn import FactorizedLinear, select_linear_layers
from rankwise.targets import Targets


def model_report(
    model: nn.Module, targets: Targets = "all-linear", *, diagnostics: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Every registered diagnostic (or those named in ``diagnostics``) of every layer ``targets``
    selects (RankwiseError if none, or for an unknown diagnostic name)."""
    names = DIAGNOSTICS.names() if diagnostics is None else list(diagnostics)
    measures = {name: DIAGNOSTICS.get(name)(method=name) for name in names}
    rows = []
    for layer_name in select_linear_layers(model, targets, include_factorized=True):
        layer = model.get_submodule(layer_name)
        weight = as_matrix(layer)
        singular_values = spectrum(weight)
        row: dict[str, Any] = {
            "name": layer_name,
            "shape": tuple(weight.shape),
            "rank": layer.rank if isinstance(layer, FactorizedLinear) else min(weight.shape),
        }
        row.update({name: measure.measure(weight, singular_values) for name, measure in measures.items()})
        rows.append(row)
    return rows
