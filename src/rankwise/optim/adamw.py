"""The full-rank baseline ``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter, "Decoupled
Weight Decay Regularization", arXiv 1711.05101) on the same two parameter groups as the
projected optimizers, with torch's defaults (betas (0.9, 0.999), eps 1e-8, weight_decay 0.01
unless given)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rankwise.errors import RankwiseError
from rankwise.optim.core import OPTIMIZERS, validate_adam_hparams

_ACCEPTED = ("betas", "eps", "weight_decay")


@OPTIMIZERS.register(
    "adamw",
    family="baseline",
    paper="Decoupled Weight Decay Regularization",
    arxiv="1711.05101",
)
def build_adamw(
    projected: Sequence[tuple[str, torch.Tensor]], others: Sequence[torch.Tensor], *, lr: float, **hparams: Any
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with group 0 = the targeted weights, group 1 = the rest."""
    unknown = sorted(set(hparams) - set(_ACCEPTED))
    if unknown:
        raise RankwiseError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for adamw; accepted: {', '.join(_ACCEPTED)}"
        )
    options = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, **hparams}
    validate_adam_hparams(lr, options["betas"], options["eps"], options["weight_decay"])
    groups = [{"params": [p for _, p in projected]}]
    if others:
        groups.append({"params": list(others)})
    return torch.optim.AdamW(groups, lr=lr, **options)
