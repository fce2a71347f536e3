"""LoRA+: a larger learning rate for the adapters' output-side factor ``B``.

Paper: Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv 2402.12354. In the infinite-width limit, LoRA's ``W = W0 + s B A`` learns features
efficiently only if ``B`` moves faster than ``A``; the paper sets

    lr_B = lambda * lr_A,   lambda = loraplus_lr_ratio  (the paper's default 2^4 = 16)

and otherwise keeps the optimizer (AdamW) unchanged.

``rankwise.optim.build(model, "adamw", lr=lr, loraplus_lr_ratio=16)`` on an adapted model puts
every adapter's output factors in their own param group with learning rate ``lr * ratio`` and
every other trainable parameter (the ``A`` factors, other adapter tensors) in a group with
``lr``; weight decay and betas are shared (decoupled decay scales with each group's lr, as in
AdamW). Output factors are found generically: an adapter class lists them in
``output_factor_names`` (``("lora_B",)`` for LoRA and its subclasses); adapters that declare
none contribute only to the ``lr`` group.

Group order: group 0 = ``lr`` (what the training loop logs), group 1 = ``lr * ratio``. An LR
scheduler multiplies both, so the ratio holds throughout training.

Not offered: the separate learning rate for LoRA on embedding layers of the authors' code
(rankwise adapters wrap ``nn.Linear`` only); projected optimizers (GaLore family: projecting a
rank-r factor's gradient again makes no sense) and ``lora_pro`` (its equivalent gradient
assumes one learning rate for both factors) refuse the option.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable

import torch
from torch import nn

from rankwise.errors import RankwiseError

#: optimizers whose builder steps each parameter of a group as a whole (no projection)
LORAPLUS_OPTIMIZERS = ("adamw",)


def output_factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable output-side factors (``output_factor_names``) of every adapter layer, named."""
    from rankwise.adapters.api import adapter_layers  # the optimizers do not need adapters to import

    found: list[tuple[str, nn.Parameter]] = []
    for module_name, layer in adapter_layers(model).items():
        for attribute in getattr(type(layer), "output_factor_names", ()):
            param = getattr(layer, attribute, None)
            if isinstance(param, nn.Parameter) and param.requires_grad:
                found.append((f"{module_name}.{attribute}", param))
    return found


def build_loraplus(
    model: nn.Module,
    name: str,
    builder: Callable[..., torch.optim.Optimizer],
    *,
    lr: float,
    ratio: Any,
    targets: Any = "all-linear",
    **hparams: Any,
) -> torch.optim.Optimizer:
    """``builder`` over ``model`` with the output factors in group 1 at ``lr * ratio`` (module docstring)."""
    if name not in LORAPLUS_OPTIMIZERS:
        raise RankwiseError(
            f"loraplus_lr_ratio is offered for {', '.join(LORAPLUS_OPTIMIZERS)}, not {name!r}: LoRA+ only "
            "changes the learning rate of the adapters' B factors under an optimizer that steps them whole"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 < ratio < math.inf:
        raise RankwiseError(f"loraplus_lr_ratio must be a number > 0 (the paper uses 16), got {ratio!r}")
    if targets != "all-linear":
        raise RankwiseError(
            "with loraplus_lr_ratio the parameter groups come from the adapters; drop targets "
            "(choose layers with rankwise.adapt(..., targets=...))"
        )
    fast = output_factors(model)
    if not fast:
        raise RankwiseError(
            "loraplus_lr_ratio needs adapters with output factors (LoRA's lora_B); the model has none -- "
            "call rankwise.adapt(model, 'lora', ...) first"
        )
    fast_ids = {id(p) for _, p in fast}
    rest: list[tuple[str, nn.Parameter]] = []
    for param_name, param in model.named_parameters():  # a tied parameter is listed once
        if param.requires_grad and id(param) not in fast_ids:
            rest.append((param_name, param))
    optimizer = builder(rest, [p for _, p in fast], lr=lr, **hparams)
    optimizer.param_groups[1]["lr"] = lr * ratio
    return optimizer
