"""Everything the diagnostics say about one model (and its fine-tune), as one JSON-ready dict.

:func:`inspect_model` is what ``rankwise inspect`` writes to ``report.json`` (and renders to
``report.html`` with :func:`rankwise.analyze.inspection_page.render`):

* ``layers``: :func:`~rankwise.analyze.model_report` rows (every per-matrix diagnostic), plus
  each layer's power-law fit (``power_law``: alpha, xmin, KS distance, tail size, verdict) and
  its singular values (``spectra``);
* ``entanglement.internal``: for the layers ``entanglement_targets`` selects (by default the
  attention query and value projections: ``q_proj``, ``v_proj``, ``query``, ``value`` and
  GPT-2's fused ``c_attn``), the entanglement profile (default sites: see
  :mod:`rankwise.analyze.entanglement`) and fitted law of the update ``W1 - W0`` when a base
  is given, else of the weight itself;
* ``entanglement.external``: on the first ``attention_tokens`` tokens of the texts (rounded
  down to a power of two), every head's attention profile; per layer the mean profile over
  heads, its fitted law and how many heads each law wins;
* ``updates`` (with a base): :func:`~rankwise.analyze.update_report` rows (update norms and
  ranks, intruder dimensions);
* ``matrix_nuclear_norm`` (with texts): the Matrix Nuclear-Norm of the final hidden states;
* ``notes``: what was skipped and why.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import torch
from torch import nn

from rankwise.analyze.attention import attention_matrices
from rankwise.analyze.entanglement import entanglement_profile, fit_entanglement_law
from rankwise.analyze.heavy_tail import MIN_EIGENVALUES, eigenvalues_of_spectrum, fit_power_law
from rankwise.analyze.report import model_report, update_report
from rankwise.analyze.representations import matrix_nuclear_norm
from rankwise.analyze.selection import diagnosed_layers, layer_matrix, weight_difference
from rankwise.analyze.spectrum import spectrum
from rankwise.analyze.text_inputs import token_ids
from rankwise.errors import RankwiseError
from rankwise.targets import Targets

DEFAULT_ENTANGLEMENT_TARGETS = ("q_proj", "v_proj", "query", "value", "c_attn")
ATTENTION_TOKENS = 128


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in row.items()}


def _layers(model: nn.Module, targets: Targets) -> tuple[list[dict], dict[str, list[float]], dict[str, dict]]:
    rows, spectra, fits = [], {}, {}
    for row in model_report(model, targets):
        name = row["name"]
        singular_values = spectrum(layer_matrix(model, name))
        spectra[name] = [float(s) for s in singular_values]
        eigenvalues = eigenvalues_of_spectrum(singular_values, row["shape"])
        if eigenvalues.numel() >= MIN_EIGENVALUES:
            fit = fit_power_law(eigenvalues)
            fits[name] = {**asdict(fit), "verdict": fit.verdict}
        rows.append(_jsonable(row))
    return rows, spectra, fits


def _internal(model: nn.Module, base: nn.Module | None, targets: Targets, notes: list[str]) -> dict[str, Any]:
    try:
        names = diagnosed_layers(model, targets)
    except RankwiseError:
        notes.append(f"internal entanglement: no layer matches {targets!r}; choose layers with --entanglement-targets")
        return {"of": None, "layers": {}}
    of = "update" if base is not None else "weight"
    layers = {}
    for name in names:
        matrix = layer_matrix(model, name)
        if base is not None:
            matrix = weight_difference(layer_matrix(base, name), matrix)
            if not matrix.any():
                notes.append(f"internal entanglement: {name} did not change; no update profile")
                continue
        profile = entanglement_profile(matrix)
        entry: dict[str, Any] = {"profile": profile.to_dict()}
        if len(profile.entropies) >= 3:
            entry["law"] = fit_entanglement_law(profile).to_dict()
        layers[name] = entry
    return {"of": of, "layers": layers}


def _text_ids(texts: Sequence[str], tokenizer: Any, limit: int) -> torch.Tensor:
    pieces, count = [], 0
    for text in texts:
        if isinstance(text, str) and not text.strip():
            continue
        ids = token_ids(text, tokenizer, limit - count)
        pieces.append(ids)
        count += ids.numel()
        if count >= limit:
            break
    return torch.cat(pieces)[:limit]


def _external(model: nn.Module, texts: Sequence[str], tokenizer: Any, tokens: int) -> dict[str, Any]:
    ids = _text_ids(texts, tokenizer, tokens)
    matrices = attention_matrices(model, ids)
    layers = []
    for index, heads in enumerate(matrices):
        profiles = [entanglement_profile(head) for head in heads]
        mean = [sum(p.entropies[c] for p in profiles) / len(profiles) for c in range(len(profiles[0].entropies))]
        law = fit_entanglement_law(mean, ceiling=list(profiles[0].ceiling))
        head_laws: dict[str, int] = {}
        for profile in profiles:
            winner = fit_entanglement_law(profile).law
            head_laws[winner] = head_laws.get(winner, 0) + 1
        layers.append({"layer": index, "mean_entropies": mean, "ceiling": list(profiles[0].ceiling),
                       "law": law.to_dict(), "head_laws": head_laws,
                       "heads": [p.to_dict() for p in profiles]})
    return {"tokens": int(matrices.shape[-1]), "layers": layers}


def inspect_model(
    model: nn.Module,
    *,
    base: nn.Module | None = None,
    texts: Sequence[str] | None = None,
    tokenizer: Any = None,
    targets: Targets = "all-linear",
    entanglement_targets: Targets = DEFAULT_ENTANGLEMENT_TARGETS,
    attention_tokens: int = ATTENTION_TOKENS,
) -> dict[str, Any]:
    """The report described in the module docstring. ``texts`` need ``tokenizer``; without texts
    the external entanglement and the Matrix Nuclear-Norm are skipped (and said so in ``notes``)."""
    notes: list[str] = []
    rows, spectra, fits = _layers(model, targets)
    result: dict[str, Any] = {"layers": rows, "spectra": spectra, "power_law": fits, "notes": notes}
    small = [r["name"] for r in rows if r["name"] not in fits]
    if small:
        notes.append(f"power-law fit skipped for {len(small)} layer(s) with fewer than {MIN_EIGENVALUES} non-zero "
                     f"eigenvalues: {', '.join(small[:5])}{' ...' if len(small) > 5 else ''}")
    result["entanglement"] = {"internal": _internal(model, base, entanglement_targets, notes), "external": None}
    if base is not None:
        result["updates"] = [_jsonable(row) for row in update_report(base, model, targets)]
    if texts and tokenizer is not None:
        result["entanglement"]["external"] = _external(model, texts, tokenizer, attention_tokens)
        score = matrix_nuclear_norm(model, [t for t in texts if t.strip()], tokenizer=tokenizer)
        result["matrix_nuclear_norm"] = asdict(score)
    else:
        notes.append("no text (or no tokenizer): attention entanglement and the Matrix Nuclear-Norm were skipped; "
                     "pass --data")
    return result
