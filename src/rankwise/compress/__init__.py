"""Post-training low-rank compression of trained models.

``compress(model, "svd", ratio=0.8)`` keeps 80% of the targeted layers' weight parameters
(see :mod:`rankwise.compress.core` for what the ratio means, the allocations and the storage
rule); ``save_compressed`` / ``load_compressed`` store and rebuild the compressed model;
``compensate`` adds EoRA's low-rank correction of a compressed or quantized model as a LoRA
adapter; ``trainable_lrc`` prepares WeLore's fine-tuning of the low-rank components. One file
per method, registered in ``COMPRESSORS``; ``method_options(name)`` lists a method's options.
"""

import importlib

from rankwise.compress.core import (
    COMPRESSORS,
    Compressor,
    compress,
    method_options,
    plan_ranks,
    rank_for_ratio,
)
from rankwise.compress.compensate import COMPENSATORS, compensate
from rankwise.compress.plan import CompressionPlan
from rankwise.compress.io import load_compressed, save_compressed
from rankwise.compress.lrc import trainable_lrc

#: every method module; importing one registers it
METHOD_MODULES = ("svd", "asvd", "fwsvd", "svd_llm", "welore", "modegpt", "eora")
for _name in METHOD_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
del _name

__all__ = [
    "COMPENSATORS",
    "COMPRESSORS",
    "CompressionPlan",
    "Compressor",
    "compensate",
    "compress",
    "load_compressed",
    "method_options",
    "plan_ranks",
    "rank_for_ratio",
    "save_compressed",
    "trainable_lrc",
]
