"""Per-layer tables: every per-matrix diagnostic of a model, every update diagnostic of a fine-tune.

``model_report(model, targets)`` returns, in module order, for each selected layer (see
:mod:`rankwise.analyze.selection`: Linear, Conv1D, quantized Linear, FactorizedLinear
through its dense product, adapter layers through base + update) a dict with ``name``,
``shape`` (out, in), ``rank`` (the factorised rank, or min(out, in) otherwise) and one
column per registered per-matrix diagnostic (:func:`~rankwise.analyze.core.matrix_diagnostics`:
``effective_rank``, ``energy_rank``, ``frobenius_norm``, ``nuclear_norm``,
``power_law_alpha``, ``spectral_norm``, ``stable_rank``), all from one SVD of the layer's weight.

``update_report(base, tuned, targets)`` returns, for each selected layer of ``tuned`` that
``base`` holds with the same shape, ``name``, ``shape``, ``update_norm`` (``||W1 - W0||_F``),
``relative_update`` (``||W1 - W0||_F / ||W0||_F``), ``update_stable_rank`` and
``update_effective_rank`` of ``W1 - W0`` (None for an unchanged layer), and one column per
registered update diagnostic (:func:`~rankwise.analyze.core.update_diagnostics`:
``intruder_dimensions``).

``options`` gives diagnostics their options by name, e.g. ``{"energy_rank": {"share": 0.99}}``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from rankwise.analyze.core import Diagnostic, UpdateDiagnostic, build, matrix_diagnostics, update_diagnostics
from rankwise.analyze.numerical_rank import stable_rank_of_spectrum
from rankwise.analyze.rankme import effective_rank_of_spectrum
from rankwise.analyze.selection import diagnosed_layers, layer_matrix, paired_layers, weight_difference
from rankwise.analyze.spectrum import spectrum
from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear
from rankwise.targets import Targets


def _configured(names: Sequence[str], kind: type, options: Mapping[str, Mapping[str, Any]] | None) -> dict:
    options = dict(options or {})
    stray = sorted(set(options) - set(names))
    if stray:
        raise RankwiseError(f"options given for diagnostics not in this report: {', '.join(stray)}")
    return {name: build(name, kind, **options.get(name, {})) for name in names}


def model_report(
    model: nn.Module,
    targets: Targets = "all-linear",
    *,
    diagnostics: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every registered per-matrix diagnostic (or those named in ``diagnostics``) of every layer
    ``targets`` selects (RankwiseError if none, or for an unknown diagnostic name)."""
    names = matrix_diagnostics() if diagnostics is None else list(diagnostics)
    measures = _configured(names, Diagnostic, options)
    rows = []
    for layer_name in diagnosed_layers(model, targets):
        layer = model.get_submodule(layer_name)
        weight = layer_matrix(model, layer_name)
        singular_values = spectrum(weight)
        row: dict[str, Any] = {
            "name": layer_name,
            "shape": tuple(weight.shape),
            "rank": layer.rank if isinstance(layer, FactorizedLinear) else min(weight.shape),
        }
        row.update({name: measure.measure(weight, singular_values) for name, measure in measures.items()})
        rows.append(row)
    return rows


def update_report(
    base: nn.Module,
    tuned: nn.Module,
    targets: Targets = "all-linear",
    *,
    diagnostics: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The update ``W1 - W0`` of every layer ``tuned`` shares with ``base`` and every registered update
    diagnostic (or those in ``diagnostics``) on it (see the module docstring)."""
    names = update_diagnostics() if diagnostics is None else list(diagnostics)
    measures = _configured(names, UpdateDiagnostic, options)
    rows = []
    for layer_name in paired_layers(base, tuned, targets):
        w0, w1 = layer_matrix(base, layer_name), layer_matrix(tuned, layer_name)
        update = weight_difference(w0, w1)
        singular_values = spectrum(update)
        norm = float(singular_values.double().pow(2).sum().sqrt())
        base_norm = float(w0.double().norm())
        changed = norm > 0
        row: dict[str, Any] = {
            "name": layer_name,
            "shape": tuple(w0.shape),
            "update_norm": norm,
            "relative_update": norm / base_norm if base_norm > 0 else None,
            "update_stable_rank": stable_rank_of_spectrum(singular_values) if changed else None,
            "update_effective_rank": effective_rank_of_spectrum(singular_values) if changed else None,
        }
        row.update({name: measure.measure(w0, w1) for name, measure in measures.items()})
        rows.append(row)
    return rows
