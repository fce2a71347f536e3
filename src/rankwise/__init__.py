"""rankwise: low rank for cheap large-model training, measured side by side.

Pillars (each a sub-package with its own registry):

- ``rankwise.adapters``  parameter-efficient fine-tuning (``adapt``, ``merge``, ``unload``, ...)
- ``rankwise.optim``     low-rank gradient-projection optimizers (``build``, ``state_bytes``)
- ``rankwise.pretrain``  low-rank / sparse parametrisations for training from scratch
- ``rankwise.compress``  low-rank compression of trained models
- ``rankwise.analyze``   spectral diagnostics
- ``rankwise.bench``     the side-by-side benchmark behind ``rankwise bench``
"""

from rankwise import analyze, optim, pretrain
from rankwise.adapters import (
    adapt,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    export_peft,
    import_peft,
    init_report,
    load_adapter,
    merge,
    methods,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from rankwise.compress import compensate, compress, load_compressed, save_compressed
from rankwise.densify import densify
from rankwise.errors import RankwiseError
from rankwise.pretrain import parametrize
from rankwise.quantize import quantize  # QLoRA bases: rankwise.quantize(model, "nf4" | "fp4" | "int8")

__version__ = "0.1.0"

__all__ = [
    "RankwiseError",
    "adapt",
    "add_weighted_adapter",
    "analyze",
    "compensate",
    "compress",
    "delete_adapter",
    "densify",
    "disable_adapter",
    "export_peft",
    "import_peft",
    "init_report",
    "load_adapter",
    "load_compressed",
    "merge",
    "methods",
    "optim",
    "parametrize",
    "pretrain",
    "quantize",
    "save_adapter",
    "save_compressed",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
