"""Low-rank gradient optimizers (GaLore family), LoRA-Pro and the AdamW baseline.

``build(model, name, lr=..., targets="all-linear", **hparams)`` builds the optimizer class
registered under ``name`` in :data:`OPTIMIZERS` through its ``from_model``: for the projected
optimizers and AdamW the 2-D weights of the targeted ``nn.Linear`` layers form param group 0
(the projected group) and every other trainable parameter group 1 (plain AdamW); LoRA-Pro
makes one group per LoRA pair of an adapted model. ``method_options(name)`` lists what
``hparams`` may hold, with defaults and help. The framework (projector x inner optimizer x
update rule, the sealed step and its hooks) and the guide to adding a method are in
:mod:`rankwise.optim.lowrank`; the registry and the class declarations in :mod:`rankwise.optim.base`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.optim.base import OPTIMIZERS, method_options, split_parameters
from rankwise.optim.layerwise import LayerwiseOptimizer, check_layerwise
from rankwise.optim.loraplus import build_loraplus
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.state import state_bytes
from rankwise.targets import Targets

# Method modules register themselves on import.
from rankwise.optim import adamw  # noqa: E402,F401  isort: skip
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

__all__ = [
    "OPTIMIZERS", "APOLLOAdamW", "APOLLOMiniAdamW", "DCTAdamW", "FRUGAL", "FrugalAdamW", "LDAdamW",
    "GradNormLoRPAdamW", "GaLoreAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW8bit", "FiraAdamW", "divide_params",
    "LayerwiseOptimizer", "LoRAProAdamW", "LowRankAdamW", "build", "method_options", "names",
    "split_parameters", "state_bytes",
]


def names() -> list[str]:
    """Registered optimizer names."""
    return OPTIMIZERS.names()


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

    ``hparams`` are checked against ``method_options(name)``: an unknown name or a bad value
    raises a RankwiseError that names the option and says what it accepts, before anything
    is built.

    ``layerwise=True`` returns a :class:`LayerwiseOptimizer` that steps each parameter from
    its post-accumulate-grad hook, every ``accumulation_steps`` backward passes (default 1);
    see :mod:`rankwise.optim.layerwise`.

    ``loraplus_lr_ratio`` (LoRA+, :mod:`rankwise.optim.loraplus`): on an adapted model, the
    adapters' B factors get ``lr * loraplus_lr_ratio`` in group 1, everything else ``lr`` in group 0.

    On an adapted model the trainable parameters are the adapters' (see
    :func:`split_parameters`), so every optimizer trains the adapter; one that cannot move an
    all-zero weight (weight-normalised: ``gradnorm_lorp``) refuses a projected weight that is
    zero (LoRA's ``B`` at init). A projected group whose
    ``rank`` is at least the smaller side of some of its weights warns (RuntimeWarning): the
    projection keeps the whole gradient there, and the projector's state comes on top of
    moments as large as AdamW's.
    """
    if layerwise:
        accumulation_steps = check_layerwise(model, accumulation_steps, hparams)
    elif accumulation_steps is not None:
        raise RankwiseError(
            "accumulation_steps applies to layerwise mode; without layerwise=True accumulate in the "
            "training loop (call step() every N micro-batches)"
        )
    optimizer_class = OPTIMIZERS.get(name)
    if loraplus_lr_ratio is not None:
        optimizer = build_loraplus(model, name, lr=lr, ratio=loraplus_lr_ratio, targets=targets, **hparams)
    else:
        optimizer = optimizer_class.from_model(model, lr=lr, targets=targets, **hparams)
    _refuse_frozen_zeros(optimizer, optimizer_class, name)
    _warn_if_full_rank(optimizer, name)
    return LayerwiseOptimizer(optimizer, accumulation_steps=accumulation_steps) if layerwise else optimizer


def _warn_if_full_rank(optimizer: torch.optim.Optimizer, name: str) -> None:
    """RuntimeWarning when a projected group's rank >= min(m, n) of some of its weights (see :func:`build`)."""
    for group in optimizer.param_groups:
        rank = group.get("rank")
        if rank is None:
            continue
        full = [p for p in group["params"] if p.ndim == 2 and rank >= min(p.shape)]
        if full:
            shape = tuple(full[0].shape)
            warnings.warn(
                f"{name}: rank {rank} >= min(m, n) for {len(full)} of the {len(group['params'])} projected weights "
                f"(e.g. {shape[0]} x {shape[1]}): the projection keeps their whole gradient, so they keep moments as "
                "large as AdamW's plus the projector's state -- more optimizer state than AdamW. Use a rank below "
                f"{min(shape)} (a quarter of it is common) or leave those layers out of the targets",
                RuntimeWarning,
                stacklevel=3,
            )


def _refuse_frozen_zeros(optimizer: torch.optim.Optimizer, optimizer_class: type, name: str) -> None:
    """RankwiseError when the optimizer cannot move an all-zero weight and group 0 holds one."""
    if not getattr(optimizer_class, "zero_weights_stay_zero", False) or not optimizer.param_groups:
        return
    zero = [p for p in optimizer.param_groups[0]["params"] if p.ndim == 2 and not p.is_meta and not p.detach().any()]
    if zero:
        described = getattr(optimizer, "param_name", lambda p: f"a {tuple(p.shape)} weight")(zero[0])
        raise RankwiseError(
            f"{name} weight-normalises each row, so an all-zero weight has no direction and never moves; "
            f"{len(zero)} projected weights are zero (e.g. {described}, as LoRA's B at init). Train such an adapter "
            "with another optimizer, or use an adapter whose factors start non-zero (pissa, olora)"
        )
