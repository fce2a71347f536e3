"""The full-rank baseline ``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter, "Decoupled
Weight Decay Regularization", arXiv 1711.05101) on the same two parameter groups as the
projected optimizers, with torch's defaults: betas (0.9, 0.999), eps 1e-8 (on the
bias-corrected ``sqrt(v_hat)``), weight_decay 0.01, applied before the update::

    W <- W (1 - lr wd) ;  W <- W - lr m_hat / (sqrt(v_hat) + eps)

It steps DTensor shards itself (FSDP2) and runs in layerwise mode through torch's own step.
"""

from __future__ import annotations

import torch

from rankwise.optim.base import OPTIMIZERS, OptimizerMethod
from rankwise.optim.options import ADAM, with_defaults, without


@OPTIMIZERS.register(
    "adamw",
    family="baseline",
    paper="Decoupled Weight Decay Regularization",
    arxiv="1711.05101",
    supports=("layerwise", "ddp", "fsdp2", "loraplus"),
)
class AdamW(OptimizerMethod, torch.optim.AdamW):
    """``torch.optim.AdamW`` registered as ``adamw``: group 0 = the targeted weights, group 1 = the rest."""

    HYPERPARAMETERS = with_defaults(without(ADAM, "correct_bias"), eps=1e-8, weight_decay=1e-2)
