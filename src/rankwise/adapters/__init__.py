"""Parameter-efficient fine-tuning: adapter layers around frozen nn.Linear weights.

Public API::

    adapt(model, method, *, rank=8, alpha=None, targets="all-linear", data=None, **options) -> model
    methods() -> list[str]
    trainable_parameters(model) -> int
    merge(model) / unmerge(model)
    unload(model) -> model
    save_adapter(model, dir) / load_adapter(base_model, dir) -> model
    export_peft(model, dir) -> report / import_peft(base_model, dir) -> model   (PEFT LoRA format)
    init_report(model) -> seconds each layer's init took
    regularization_loss(model) / after_step(model, ...)   (training-time hooks)

``AdapterLayer`` is the base class of every method and ``ADAPTERS`` their registry; see
``rankwise.adapters.base`` for how to add a method. Importing a method module below
registers it.
"""

from rankwise.adapters import lora  # noqa: F401  (registers "lora")
from rankwise.adapters import corda  # noqa: F401  (registers "corda")
from rankwise.adapters import eva  # noqa: F401  (registers "eva")
from rankwise.adapters import lora_ga  # noqa: F401  (registers "lora_ga")
from rankwise.adapters import lora_sb  # noqa: F401  (registers "lora_sb")
from rankwise.adapters import loldu  # noqa: F401  (registers "loldu")
from rankwise.adapters import olora  # noqa: F401  (registers "olora")
from rankwise.adapters import pissa  # noqa: F401  (registers "pissa")
from rankwise.adapters import sorsa  # noqa: F401  (registers "sorsa")
from rankwise.adapters import svfit  # noqa: F401  (registers "svfit")
from rankwise.adapters import adalora  # noqa: F401  (registers "adalora")
from rankwise.adapters import dylora  # noqa: F401  (registers "dylora")
from rankwise.adapters import increlora  # noqa: F401  (registers "increlora")
from rankwise.adapters import sora  # noqa: F401  (registers "sora")
from rankwise.adapters import lora_pro  # noqa: F401  (registers "lora_pro")
from rankwise.adapters import lora_ggpo  # noqa: F401  (registers "lora_ggpo")
from rankwise.adapters.api import init_report
from rankwise.adapters.api import adapt, adapter_layers, merge, methods, trainable_parameters, unload, unmerge
from rankwise.adapters.base import ADAPTERS, AdapterLayer
from rankwise.adapters.hooks import after_step, regularization_loss
from rankwise.adapters.io import load_adapter, save_adapter
from rankwise.adapters.peft_io import export_peft, import_peft
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
    "export_peft",
    "import_peft",
    "init_report",
    "load_adapter",
    "merge",
    "regularization_loss",
    "methods",
    "save_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
