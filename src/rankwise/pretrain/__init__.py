"""Parametrisations for pretraining from scratch with fewer trainable parameters.

``parametrize(model, "lowrank", rank=64)`` turns every targeted Linear into ``W = B A``.
One file per method, registered in ``PARAMETRISATIONS``; ``method_options(name)`` lists a
method's declared options (see :mod:`rankwise.pretrain.core` for how to add one).
"""

from rankwise.pretrain.core import PARAMETRISATIONS, Parametrisation, method_options, parametrisation, parametrize
from rankwise.pretrain import lowrank  # noqa: F401  (registers "lowrank")

__all__ = ["PARAMETRISATIONS", "Parametrisation", "method_options", "parametrisation", "parametrize"]
