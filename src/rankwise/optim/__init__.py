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
from rankwise.optim.layerwise import LayerwiseOptimizer, check_layerwise
from rankwise.targets import Targets, match_targets

# Method modules register themselves on import.
from rankwise.optim import adamw  # noqa: E402,F401  isort: skip
from rankwise.optim import galore  # noqa: E402  isort: skip
from rankwise.optim.galore import GaLoreAdamW  # noqa: E402  isort: skip
from rankwise.optim.galore8bit import GaLoreAdamW8bit  # noqa: E402  isort: skip
from rankwise.optim.qgalore import QGaLoreAdamW8bit  # noqa: E402  isort: skip
from rankwise.optim.fira import FiraAdamW, divide_params  # noqa: E402  isort: skip
from rankwise.optim.apollo import APOLLOAdamW, APOLLOMiniAdamW  # noqa: E402  isort: skip
from rankwise.optim.dct import DCTAdamW  # noqa: E402  isort: skip
from rankwise.optim.frugal import FRUGAL, FrugalAdamW  # noqa: E402  isort: skip
from rankwise.optim.ldadam import LDAdamW  # noqa: E402  isort: skip
from rankwise.optim.gradnorm_lorp import GradNormLoRPAdamW  # noqa: E402  isort: skip
from rankwise.optim.lora_pro import LoRAProAdamW  # noqa: E402  isort: skip
from rankwise.optim.loraplus import build_loraplus  # noqa: E402  isort: skip

__all__ = ["OPTIMIZERS", "APOLLOAdamW", "APOLLOMiniAdamW", "DCTAdamW", "FRUGAL", "FrugalAdamW", "LDAdamW", "GradNormLoRPAdamW", "GaLoreAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW8bit", "FiraAdamW", "divide_params", "LayerwiseOptimizer", "LoRAProAdamW", "LowRankAdamW", "build", "names", "split_parameters", "state_bytes"]


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
    model: nn.Module,
    name: str,
    *,
    lr: float,
    targets: Targets = "all-linear",
    layerwise: bool = False,
    accumulation_steps: int | None = None,
    loraplus_lr_ratio: float | None = None,
    **hparams: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters (see module docstring).

    ``layerwise=True`` returns a :class:`LayerwiseOptimizer` that steps each parameter from
    its post-accumulate-grad hook, every ``accumulation_steps`` backward passes (default 1);
    see :mod:`rankwise.optim.layerwise`.

    ``loraplus_lr_ratio`` (LoRA+, :mod:`rankwise.optim.loraplus`): on an adapted model, the
    adapters' B factors get ``lr * loraplus_lr_ratio`` in group 1, everything else ``lr`` in group 0.
    A builder with ``takes_model = True`` (``lora_pro``) is called as ``builder(model, lr=...,
    targets=..., **hparams)`` and makes its own groups.
    """
    if layerwise:
        accumulation_steps = check_layerwise(model, accumulation_steps, hparams)
    elif accumulation_steps is not None:
        raise RankwiseError(
            "accumulation_steps applies to layerwise mode; without layerwise=True accumulate in the "
            "training loop (call step() every N micro-batches)"
        )
    builder = OPTIMIZERS.get(name)
    if loraplus_lr_ratio is not None:
        optimizer = build_loraplus(model, name, builder, lr=lr, ratio=loraplus_lr_ratio, targets=targets, **hparams)
    elif getattr(builder, "takes_model", False):
        optimizer = builder(model, lr=lr, targets=targets, **hparams)
    else:
        projected, others = split_parameters(model, targets)
        optimizer = builder(projected, others, lr=lr, **hparams)
    return LayerwiseOptimizer(optimizer, accumulation_steps=accumulation_steps) if layerwise else optimizer
