"""Parameter-efficient fine-tuning: adapter layers around frozen Linear-like (Linear, GPT-2 Conv1D,
bitsandbytes 4-bit / 8-bit), Embedding and Conv2d weights.

Public API::

    adapt(model, method, *, rank=8, alpha=None, targets="all-linear", data=None,
          adapter_name="default", loss_fn=None, **options) -> model
    methods() -> list[str]
    method_options(method) -> {option name: Option}   (what adapt(..., **options) accepts)
    trainable_parameters(model) -> int
    merge(model, *, allow_lossy=False) / unmerge(model, *, allow_lossy=False)
    unload(model, *, allow_lossy=False) -> model
    save_adapter(model, dir, adapter_name=None) / load_adapter(base_model, dir, adapter_name="default") -> model
    export_peft(model, dir) -> report / import_peft(base_model, dir) -> model   (PEFT LoRA format)
    adapter_names(model) / active_adapter(model) / set_adapter(model, name) / delete_adapter(model, name)
    with disable_adapter(model): ...                   (the base model's outputs)
    add_weighted_adapter(model, adapters, weights, name, combination_type="svd" | "linear" | "cat")
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
    active_adapter,
    adapt,
    adapter_layers,
    adapter_names,
    init_report,
    merge,
    method_options,
    methods,
    trainable_parameters,
    unload,
    unmerge,
)
from rankwise.adapters.base import ADAPTERS, AdapterLayer, AdapterSet, LoraParameters
from rankwise.adapters.hooks import after_step, effective_ranks, regularization_loss
from rankwise.adapters.io import load_adapter, save_adapter
from rankwise.adapters.named import delete_adapter, disable_adapter, set_adapter
from rankwise.adapters.peft_export import export_peft
from rankwise.adapters.peft_import import import_peft
from rankwise.adapters.weighted import add_weighted_adapter
from rankwise.calibration import LayerStatistics, collect_layer_inputs, collect_weight_gradients

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
    importlib.import_module(f"{__name__}.{_module.name}")  # a method module registers itself
del _module

__all__ = [
    "ADAPTERS",
    "AdapterLayer",
    "AdapterSet",
    "LayerStatistics",
    "LoraParameters",
    "active_adapter",
    "adapt",
    "add_weighted_adapter",
    "adapter_layers",
    "adapter_names",
    "after_step",
    "collect_layer_inputs",
    "collect_weight_gradients",
    "delete_adapter",
    "disable_adapter",
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
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
