"""Parametrisations for pretraining from scratch with fewer trainable parameters.

``parametrize(model, "lowrank", rank=64)`` turns every targeted Linear into ``W = B A``.
One file per method, registered in ``PARAMETRISATIONS``.
"""

from rankwise.pretrain.core import PARAMETRISATIONS, Parametrisation, parametrize
from rankwise.pretrain import lowrank  # noqa: F401  (registers "lowrank")

__all__ = ["PARAMETRISATIONS", "Parametrisation", "parametrize"]
