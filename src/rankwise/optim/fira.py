"""Fira: GaLore plus the norm-scaled residual outside the subspace (``fira``, :class:`FiraAdamW`).

Paper: Chen, Feng, Li, Lai, Yue, Yuan, Wang, "Fira: Can We Achieve Full-rank Training of
LLMs Under Low-rank Constraint?", arXiv 2410.01623.

GaLore (:mod:`rankwise.optim.galore`) runs Adam on ``R_t = P^T G_t`` and drops
``G_t - P R_t``. Fira keeps that residual and gives it Adam's scaling "for free": the
ratio by which Adam rescales each channel of the low-rank gradient is applied to the same
channel of the residual (norm-based scaling), and a norm-growth limiter stops the
residual's norm from jumping (the loss spikes after a subspace switch)::

    N_t   = M_t / (sqrt(V_t) + eps)                               (Adam on R_t, as GaLore)
    phi_j = ||N_t[:, j]|| / (||R_t[:, j]|| + 1e-8)                 per channel j
    S_t   = phi * (G_t - P R_t)                                   residual, channel-wise
    if ||S_t|| / ||S_{t-1}|| > gamma:  S_t <- S_t * gamma ||S_{t-1}|| / ||S_t||     (gamma = 1.01)
    W    -= lr * sqrt(1 - b2^t) / (1 - b1^t) * (alpha P N_t + S_t)
    W    -= lr * weight_decay * W

A channel is a column of the ``r x n`` low-rank matrix when the basis acts on the left
(``std`` with ``m < n``), a row of ``m x r`` when it acts on the right; with ``full`` (both
sides, no channel survives) phi is one number, ``||N_t|| / ||R_t||``. ``||S_{t-1}||`` is the
limited norm of the previous step (``state["residual_norm"]``, the ``+1`` of the memory
formula ``2 n r + m r + 1``); the limiter is skipped at a parameter's first step.

Group keys follow the ``fira`` package: ``rank``, ``update_proj_gap``, ``alpha`` (the scale;
``scale`` is accepted as an alias so rankwise's common ``--scale`` works), ``proj_type``.
:func:`divide_params` builds the two groups like fira's helper.

Deviations from the reference package (fira 1.0.2):
- The scale ``alpha`` multiplies only the low-rank update ``P N_t``, as in the paper; the
  package also multiplies the subtracted ``P R_t`` (``G - alpha P R_t``). The two agree at
  ``alpha = 1``, the package's default.
- ``proj_type="full"`` uses one tensor-wise ratio (the package fails to broadcast) and the
  channel side follows the basis side, also when ``rank`` equals a dimension.
- The limiter's norms are kept in float32 (float64 for float64 weights) whatever the weight
  dtype (:func:`rankwise.optim.rules.limit_norm_growth`, shared with APOLLO).
- As every rankwise optimizer: projector as tensors (``weights_only`` checkpoints),
  non-finite gradients and failed SVDs never reach the weights, ``moment_policy``
  (default ``keep``, the paper's) and ``bias_correction`` (default ``global``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import SUBSPACE, without
from rankwise.optim.pieces import LowRankStep, UpdateRule
from rankwise.optim.projectors import REFRESH, SVDProjector
from rankwise.optim.rules import limit_norm_growth
from rankwise.options import Option

RATIO_EPS = 1e-8  # keeps phi finite on channels where R_t is zero


def channel_scaling(direction: torch.Tensor, low_grad: torch.Tensor, *, left: bool, right: bool) -> torch.Tensor:
    """``phi = ||N[channel]|| / (||R[channel]|| + 1e-8)``, shaped to broadcast over ``m x n``.

    Channels are columns when only the left side is projected (``r x n``), rows when only
    the right side is (``m x r``), the whole tensor when both are.
    """
    if left and right:
        return direction.norm() / (low_grad.norm() + RATIO_EPS)
    dim = 0 if left else 1
    ratio = direction.norm(dim=dim) / (low_grad.norm(dim=dim) + RATIO_EPS)
    return ratio if left else ratio.unsqueeze(1)


class FiraResidual(UpdateRule):
    """``alpha P N + limiter(phi * (G - P R))`` (see module docstring)."""

    def combine(self, step: LowRankStep) -> torch.Tensor:
        basis = step.basis
        phi = channel_scaling(
            step.direction, step.low_grad, left=basis.left is not None, right=basis.right is not None
        )
        residual = limit_norm_growth((step.grad - step.project_back(step.low_grad)) * phi, step.state, "residual_norm")
        return step.project_back(step.direction) * step.group["alpha"] + residual


@OPTIMIZERS.register(
    "fira",
    family="galore",
    paper="Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
    arxiv="2410.01623",
    supports=("layerwise", "ddp", "fsdp2"),
)
class FiraAdamW(LowRankAdamW):
    """Drop-in for ``fira.FiraAdamW``: a group is projected iff it has ``rank``; scale key ``alpha``
    (``scale`` is accepted as another name for it).

    ``FiraAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True)``
    """

    projector = SVDProjector()
    update_rule = FiraResidual()
    OPTIONS = {
        **without(SUBSPACE, "scale"),
        **REFRESH,
        "alpha": Option(1.0, float, low=0, low_open=True, help="scale of the low-rank update alpha P N (fira's name)"),
    }
    ALIASES = {"scale": "alpha"}


def divide_params(
    model: nn.Module,
    target_modules_list: Sequence[str],
    rank: int = 8,
    update_proj_gap: int = 200,
    alpha: float = 1.0,
    proj_type: str = "std",
) -> list[dict]:
    """Two param groups like ``fira.divide_params``: every other parameter, then the weights
    of the ``nn.Linear`` modules whose name contains one of ``target_modules_list`` with the
    projection keys."""
    projected = [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(key in name for key in target_modules_list)
    ]
    if not projected:
        linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise RankwiseError(
            f"no nn.Linear module name contains any of {list(target_modules_list)!r}; "
            f"Linear modules are e.g. {', '.join(linear[:8]) or '(none)'}"
        )
    chosen = {id(p) for p in projected}
    regular = [p for p in model.parameters() if id(p) not in chosen]
    keys = {"rank": rank, "update_proj_gap": update_proj_gap, "alpha": alpha, "proj_type": proj_type}
    return [{"params": regular}, {"params": projected, **keys}]
