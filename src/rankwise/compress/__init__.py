"""Post-training low-rank compression into :class:`rankwise.nn.FactorizedLinear`.

``compress(model, "svd", ratio=0.8)`` keeps 80% of the targeted layers' weight parameters
(see :mod:`rankwise.compress.core` for the exact rank rule); ``save_compressed`` /
``load_compressed`` store and rebuild the factorised model. One file per method, registered
in ``COMPRESSORS``; ``method_options(name)`` lists a method's declared options.
"""

from rankwise.compress.core import (
    COMPRESSORS,
    CompressionPlan,
    Compressor,
    compress,
    method_options,
    plan_ranks,
    rank_for_ratio,
)
from rankwise.compress import svd  # noqa: F401  (registers "svd")
from rankwise.compress.io import load_compressed, save_compressed

__all__ = [
    "COMPRESSORS",
    "CompressionPlan",
    "Compressor",
    "compress",
    "load_compressed",
    "method_options",
    "plan_ranks",
    "rank_for_ratio",
    "save_compressed",
]
