"""Which layers of a model the diagnostics read, and how two models' layers are paired.

A diagnosed layer is a whole matrix a model applies: a Linear-like layer (``nn.Linear``,
transformers' ``Conv1D``, a bitsandbytes quantized Linear; see :mod:`rankwise.layers`), a
:class:`~rankwise.nn.FactorizedLinear` (its product) or an adapter layer (its base weight
plus update). The inner layers of the last two (``down`` / ``up``, ``base``) are never
reported on their own. ``targets`` selects among them as everywhere in rankwise
(:mod:`rankwise.targets`; ``"all-linear"`` leaves out the output head).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.adapters.base import AdapterLayer
from rankwise.analyze.spectrum import as_matrix
from rankwise.errors import RankwiseError
from rankwise.layers import is_linear_like
from rankwise.nn import FactorizedLinear
from rankwise.targets import Targets, match_targets

_WHOLE = (FactorizedLinear, AdapterLayer)


def _is_diagnosed(module: nn.Module) -> bool:
    return isinstance(module, _WHOLE) or is_linear_like(module)


def diagnosed_layers(model: nn.Module, targets: Targets = "all-linear") -> list[str]:
    """Names of the layers ``targets`` selects, in module order (RankwiseError when none)."""
    inner: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _WHOLE):
            inner.update(f"{name}.{child}" for child, _ in module.named_modules() if child)
    wholes = any(isinstance(m, _WHOLE) for m in model.modules())
    if not wholes:
        return match_targets(model, targets)
    # match_targets' "all-linear" must also see the wrappers, so select over both kinds
    chosen: set[str] = set()
    for kind in (None, FactorizedLinear, AdapterLayer):
        try:
            chosen.update(match_targets(model, targets, kind=kind))
        except RankwiseError:
            pass
    chosen -= inner
    if not chosen:
        match_targets(model, targets)  # raises the error that lists the candidates
        raise RankwiseError(f"targets {targets!r} matched only layers inside factorised or adapter layers")
    return [name for name, module in model.named_modules() if name in chosen and _is_diagnosed(module)]


def layer_matrix(model: nn.Module, name: str) -> torch.Tensor:
    """The ``out x in`` weight layer ``name`` of ``model`` applies (detached)."""
    return as_matrix(model.get_submodule(name))


def weight_difference(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """``tuned - base`` in float64 when either is float64, else float32 (never in a half type)."""
    dtype = torch.float64 if torch.float64 in (base.dtype, tuned.dtype) else torch.float32
    return tuned.to(dtype) - base.to(device=tuned.device, dtype=dtype)


def paired_layers(base: nn.Module, tuned: nn.Module, targets: Targets = "all-linear") -> list[str]:
    """The layers of ``tuned`` selected by ``targets`` that ``base`` holds under the same name and
    shape, in module order. RankwiseError when a selected layer is missing from ``base`` or its
    shape differs (the two are not the same architecture)."""
    names = diagnosed_layers(tuned, targets)
    base_modules = dict(base.named_modules())
    for name in names:
        if name not in base_modules or not _is_diagnosed(base_modules[name]):
            raise RankwiseError(
                f"layer {name!r} of the tuned model has no counterpart in the base model; pass the base the "
                "tuned model was fine-tuned from"
            )
        tuned_shape, base_shape = tuple(layer_matrix(tuned, name).shape), tuple(layer_matrix(base, name).shape)
        if tuned_shape != base_shape:
            raise RankwiseError(f"layer {name!r} is {tuned_shape} in the tuned model but {base_shape} in the base")
    return names
