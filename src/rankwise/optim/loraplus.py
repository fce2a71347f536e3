"""LoRA+: a larger learning rate for the adapters' output-side factor ``B``.

Paper: Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
arXiv 2402.12354. In the infinite-width limit, LoRA's ``W = W0 + s B A`` learns features
efficiently only if ``B`` moves faster than ``A``; the paper sets

    lr_B = lambda * lr_A,   lambda = loraplus_lr_ratio  (the paper's default 2^4 = 16)

and otherwise keeps the optimizer (AdamW) unchanged.

``rankwise.optim.build(model, "adamw", lr=lr, loraplus_lr_ratio=16)`` on an adapted model puts
the ``B`` factor of every LoRA-shaped adapter layer in its own param group with learning rate
``lr * ratio`` and every other trainable parameter (the ``A`` factors, other adapter tensors)
in a group with ``lr``; weight decay and betas are shared (decoupled decay scales with each
group's lr, as in AdamW). LoRA-shaped layers are those whose ``AdapterLayer.lora_parameters()``
returns their factors (LoRA and the layers that rewrite the base but train plain LoRA
factors); other adapters contribute only to the ``lr`` group. The optimizers LoRA+ may
regroup are those whose registry entry supports ``"loraplus"``.

Group order: group 0 = ``lr`` (what the training loop logs), group 1 = ``lr * ratio``. An LR
scheduler multiplies both, so the ratio holds throughout training.

Not offered: the separate learning rate for LoRA on embedding layers of the authors' code
(rankwise adapters wrap ``nn.Linear`` only); projected optimizers (GaLore family: projecting a
rank-r factor's gradient again makes no sense) and ``lora_pro`` (its equivalent gradient
assumes one learning rate for both factors) refuse the option.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.optim.base import OPTIMIZERS
from rankwise.options import Option

LORAPLUS_LR_RATIO = Option(16.0, float, low=0, low_open=True, help="lr of the B factors / lr (the paper's lambda)")


def output_factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable ``B`` factors of the LoRA-shaped adapter layers (``lora_parameters()``), named."""
    from rankwise.adapters.base import AdapterLayer  # the optimizers do not need adapters to import

    found: list[tuple[str, nn.Parameter]] = []
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            factors = module.lora_parameters()
            if factors is not None and factors.B.requires_grad:
                found.append((f"{module_name}.lora_B", factors.B))
    return found


def build_loraplus(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    ratio: Any,
    targets: Any = "all-linear",
    **hparams: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model`` with the ``B`` factors in group 1 at ``lr * ratio`` (module docstring)."""
    supported = [entry.name for entry in OPTIMIZERS.entries() if "loraplus" in entry.supports]
    if name not in supported:
        raise RankwiseError(
            f"loraplus_lr_ratio is offered for {', '.join(supported)}, not {name!r}: LoRA+ only "
            "changes the learning rate of the adapters' B factors under an optimizer that steps them whole"
        )
    ratio = LORAPLUS_LR_RATIO.check("loraplus_lr_ratio", ratio, "LoRA+")
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
    optimizer = OPTIMIZERS.get(name).from_parameters(rest, [p for _, p in fast], lr=lr, **hparams)
    optimizer.param_groups[1]["lr"] = lr * ratio
    return optimizer
