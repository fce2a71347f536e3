"""Parameter-efficient fine-tuning: adapter layers around frozen nn.Linear weights.

Public API::

    adapt(model, method, *, rank=8, alpha=None, targets="all-linear", data=None, **options) -> model
    methods() -> list[str]
    method_options(method) -> {option name: Option}   (what adapt(..., **options) accepts)
    trainable_parameters(model) -> int
    merge(model) / unmerge(model)
    unload(model) -> model
    save_adapter(model, dir) / load_adapter(base_model, dir) -> model
    export_peft(model, dir) -> report / import_peft(base_model, dir) -> model   (PEFT LoRA format)
    init_report(model) -> seconds each layer's init took
    regularization_loss(model) / after_step(model, ...)   (training-time hooks)
    effective_ranks(model) -> ranks still in use (pruning / growing methods)

``AdapterLayer`` is the base class of every method and ``ADAPTERS`` their registry; see
``rankwise.adapters.base`` for how to add a method. Every module of this package is imported
below, which registers the methods: a new method is one new file.
"""

import importlib
import pkgutil

from rankwise.adapters.api import (
    adapt,
    adapter_layers,
    init_report,
    merge,
    method_options,
    methods,
    trainable_parameters,
    unload,
    unmerge,
)
from rankwise.adapters.base import ADAPTERS, AdapterLayer, LoraParameters
from rankwise.adapters.hooks import after_step, effective_ranks, regularization_loss
from rankwise.adapters.io import load_adapter, save_adapter
from rankwise.adapters.peft_export import export_peft
from rankwise.adapters.peft_import import import_peft
from rankwise.calibration import LayerStatistics, collect_layer_inputs, collect_weight_gradients

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    importlib.import_module(f"{__name__}.{_module.name}")  # a method module registers itself
del _module

__all__ = [
    "ADAPTERS",
    "AdapterLayer",
    "LayerStatistics",
    "LoraParameters",
    "adapt",
    "adapter_layers",
    "after_step",
    "collect_layer_inputs",
    "collect_weight_gradients",
    "effective_ranks",
    "export_peft",
    "import_peft",
    "init_report",
    "load_adapter",
    "merge",
    "method_options",
    "methods",
    "regularization_loss",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
