"""Parametrisations for pretraining from scratch with fewer trainable parameters.

``parametrize(model, "lowrank", rank=64)`` turns every targeted Linear-like layer into
``W = B A``; ``parametrisation(name, rank=..., **options)`` gives the method object, which is
also its training hook (ReLoRA's restarts, SST's resampling, structured_ffn's self-guided
schedule) and its learning-rate schedule (``.schedule(optimizer, ...)``). One file per method,
registered in ``PARAMETRISATIONS``; ``method_options(name)`` lists a method's declared
options, ``optimizer_support(name)`` which ``rankwise.optim`` optimizers can train it (see
:mod:`rankwise.pretrain.core` for how to add one). ``project_monarch(W)`` projects a dense
matrix onto the Monarch class; ``jagged_cosine_schedule`` is ReLoRA's schedule.
"""

from rankwise.pretrain.blocks import monarch_dense, project_monarch
from rankwise.pretrain.core import (
    PARAMETRISATIONS,
    Parametrisation,
    method_options,
    optimizer_support,
    parametrisation,
    parametrize,
)
from rankwise.pretrain.schedules import jagged_cosine_schedule

# Method modules register themselves on import.
from rankwise.pretrain import lowrank  # noqa: E402,F401  isort: skip
from rankwise.pretrain import relora  # noqa: E402,F401  isort: skip
from rankwise.pretrain import sltrain  # noqa: E402,F401  isort: skip
from rankwise.pretrain import lost  # noqa: E402,F401  isort: skip
from rankwise.pretrain import structured_ffn  # noqa: E402,F401  isort: skip
from rankwise.pretrain import monarch  # noqa: E402,F401  isort: skip
from rankwise.pretrain import sst  # noqa: E402,F401  isort: skip

__all__ = [
    "PARAMETRISATIONS", "Parametrisation", "jagged_cosine_schedule", "method_options", "monarch_dense",
    "optimizer_support", "parametrisation", "parametrize", "project_monarch",
]
