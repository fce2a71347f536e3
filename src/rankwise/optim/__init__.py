"""Low-rank gradient optimizers (GaLore family) and the AdamW baseline.

``build(model, name, lr=..., targets="all-linear", **hparams)`` puts the 2-D weights of the
targeted ``nn.Linear`` layers into param group 0 (the projected group) and every other
trainable parameter into group 1 (plain AdamW), then calls the builder registered under
``name`` in :data:`OPTIMIZERS`. The framework (projector x inner optimizer x residual rule)
and the guide to adding a method are in :mod:`rankwise.optim.core`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.optim.core import OPTIMIZERS, LowRankAdamW, state_bytes
from rankwise.targets import Targets, match_targets

# Method modules register themselves on import.
from rankwise.optim import adamw  # noqa: E402,F401  isort: skip
from rankwise.optim import galore  # noqa: E402  isort: skip
from rankwise.optim.galore import GaLoreAdamW  # noqa: E402  isort: skip

__all__ = ["OPTIMIZERS", "GaLoreAdamW", "LowRankAdamW", "build", "names", "split_parameters", "state_bytes"]


def names() -> list[str]:
    """Registered optimizer names."""
    return OPTIMIZERS.names()


def split_parameters(
    model: nn.Module, targets: Targets = "all-linear"
) -> tuple[list[tuple[str, nn.Parameter]], list[nn.Parameter]]:
    """``(projected, others)``: named trainable weights of the targeted Linear layers, and the
    remaining trainable parameters (a tied / shared parameter appears once)."""
    projected: list[tuple[str, nn.Parameter]] = []
    chosen: set[int] = set()
    for module_name in match_targets(model, targets):
        weight = model.get_submodule(module_name).weight
        if weight.requires_grad and id(weight) not in chosen:
            chosen.add(id(weight))
            projected.append((f"{module_name}.weight", weight))
    if not projected:
        raise RankwiseError(
            f"targets {targets!r} matched only frozen Linear layers; unfreeze them or choose other targets"
        )
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return projected, others


def build(
    model: nn.Module, name: str, *, lr: float, targets: Targets = "all-linear", **hparams: Any
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters (see module docstring)."""
    builder = OPTIMIZERS.get(name)
    projected, others = split_parameters(model, targets)
    return builder(projected, others, lr=lr, **hparams)
