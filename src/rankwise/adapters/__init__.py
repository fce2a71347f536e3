"""Parameter-efficient fine-tuning: adapter layers around frozen nn.Linear weights.

Public API::

    adapt(model, method, *, rank=8, alpha=None, targets="all-linear", data=None, **options) -> model
    methods() -> list[str]
    trainable_parameters(model) -> int
    merge(model) / unmerge(model)
    unload(model) -> model
    save_adapter(model, dir) / load_adapter(base_model, dir) -> model

``AdapterLayer`` is the base class of every method and ``ADAPTERS`` their registry; see
``rankwise.adapters.base`` for how to add a method. Importing a method module below
registers it.
"""

from rankwise.adapters import lora  # noqa: F401  (registers "lora")
from rankwise.adapters.api import adapt, adapter_layers, merge, methods, trainable_parameters, unload, unmerge
from rankwise.adapters.base import ADAPTERS, AdapterLayer
from rankwise.adapters.hooks import after_step, regularization_loss
from rankwise.adapters.io import load_adapter, save_adapter
from rankwise.calibration import LayerStatistics, collect_layer_inputs, collect_weight_gradients

__all__ = [
    "ADAPTERS",
    "AdapterLayer",
    "LayerStatistics",
    "adapt",
    "adapter_layers",
    "after_step",
    "collect_layer_inputs",
    "collect_weight_gradients",
    "load_adapter",
    "merge",
    "regularization_loss",
    "methods",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
