"""LDAdam: Adam from low-dimensional gradient statistics (``ldadam``, :class:`LDAdamW`).

Paper: Robert, Safaryan, Modoranu, Alistarh, "LDAdam: Adaptive Optimization from
Low-Dimensional Gradient Statistics", ICLR 2025, arXiv 2410.16103 (Algorithm 1).

For a weight ``W`` (``m x n``) with gradient ``G_t``, rank ``r``, written for a left
projection (``proj_type="std"`` with ``m <= n``; a right one is the transpose). ``k`` counts
the steps already taken, ``b1 = 1 - beta1^k``, ``b2 = 1 - beta2^k``::

    G   = G_t + E                                        (error feedback: E is the stored error)
    subspace, every step:
        k = 0:  P = U[:, :r] of svd(G)                   (fp32)
        k > 0:  B = rho P_old M / b1 + (1 - rho) G       (mix of momentum and gradient)
                P = qr(B (B^T P_old))                    (one block power iteration, warm start)
    projection-aware moment update (moment_policy="rotate", C = P^T P_old, r x r):
        M' = C M
        V' = |(C o C)(V / b2 - M o M / b1^2) + M' o M' / b1^2| * b2
    error feedback (error_feedback=True):
        E  = (G - P P^T G) + beta1 / (1 - beta1) (P_old M - P M')
    Adam on R = P^T G:  M = beta1 M' + (1 - beta1) R ;  V = beta2 V' + (1 - beta2) R^2
    W -= lr sqrt(1 - beta2^t) / (1 - beta1^t) * scale * P (M / (sqrt(V) + eps)) ;  W -= lr wd W

The variance correction carries Adam's second moment through the change of basis as
"variance plus squared mean": the variance ``V/b2 - M^2/b1^2`` rotates with the squared
entries of ``C`` (independent coordinates), the mean with ``C``. The error term collects what
the compression dropped from the gradient and from the momentum, so nothing is lost: it is
added to the next gradient. Identity checked by the tests: ``E + P P^T G = G + beta1 / (1 -
beta1) (P_old M - P M')``.

State per ``m x n`` weight (``m <= n``): ``M`` and ``V`` (``2 r n``), ``P`` (``m r``), and with
error feedback the error ``E`` (``m n``), all in the weight's dtype. Default hyperparameters
are the paper's: betas (0.908, 0.99), eps 1e-8, rho 0.908, a new subspace every step.

Deviations from the paper / its released code:
- The paper keeps the error in the gradient buffer (the training loop must not clear
  ``.grad``), so it costs no extra memory. rankwise stores it as the optimizer state
  ``error``: checkpoints then resume exactly, layerwise mode (which frees ``.grad``), the
  Trainer's ``model.zero_grad()`` and gradient clipping cannot destroy it, and
  :func:`rankwise.optim.state_bytes` counts it (``m n`` more numbers). ``error_feedback=False``
  (the paper's "no EF" ablation) stores nothing extra.
- The second moment rotates with ``C o C`` as in the paper's formula and the authors' release
  (whose first version squared the entries twice, ``C^4``, until its commit "fix
  mat_change_of_subspace squaring" of 31 Oct 2024).
- ``eps`` is added to ``sqrt(V)`` with the bias correction folded into the step size (the
  form of every rankwise Adam), and weight decay is applied after the update.
- ``update_proj_gap`` (default 1, the paper's) may be raised to refresh less often; between
  refreshes ``C = I`` and only the gradient part of the error remains.
- ``moment_policy`` may be ``keep`` or ``reset`` instead of the paper's ``rotate``; the error
  feedback then collects the momentum lost by that policy the same way. The shared
  ``bias_correction`` option is not offered: the variance correction above already carries
  the second moment through the change of basis with the moments' own correction.
- ``proj_method="svd"`` (exact SVD of ``B`` instead of the power iteration) is the paper's ablation.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from rankwise.linalg.projections import PROJ_TYPES, Basis, change_coordinates, projection_sides, singular_basis
from rankwise.linalg.svd import orthonormal_basis
from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.inner import bias_corrections
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import ADAM, SUBSPACE, with_defaults, without
from rankwise.optim.projectors import SVDProjector
from rankwise.optim.rules import ERROR_KEY, ErrorFeedback, add_error
from rankwise.options import Option

PROJ_METHODS = ("power_iteration", "svd")
ONE_SIDED = tuple(p for p in PROJ_TYPES if p != "full")


def power_iteration_step(matrix: torch.Tensor, start: Basis) -> Basis:
    """One block power iteration from ``start`` on the side it projects, orthonormalised by QR (fp32).

    Left: ``L = qr(A A^T L_old)``; right: ``R = qr(A^T A R_old)``. Computed in float32 (float64
    stays float64), returned in ``matrix.dtype``.
    """
    compute = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    work = matrix.to(compute)
    if start.left is not None:
        new = orthonormal_basis(work @ (work.T @ start.left.to(compute)))
        return Basis(new.to(matrix.dtype).contiguous(), None)
    new = orthonormal_basis(work.T @ (work @ start.right.to(compute)))
    return Basis(None, new.to(matrix.dtype).contiguous())


class PowerIterationProjector(SVDProjector):
    """LDAdam's subspace: SVD of the first gradient, then one warm-started power iteration per
    refresh on ``rho * (momentum projected back) + (1 - rho) * gradient``."""

    batched = False  # each refresh depends on the parameter's own momentum

    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        if not self.has_basis(state):
            use_left, use_right = projection_sides(grad.shape, group["proj_type"])
            self.store(state, singular_basis(grad, group["rank"], use_left=use_left, use_right=use_right), grad, group)
            return
        old = self.basis(state, grad)
        target = grad
        if "exp_avg" in state and state["step"] > state.get("moment_origin", 0):
            first, _ = bias_corrections(state, group)
            momentum = old.project_back(state["exp_avg"])
            target = momentum.mul_(group["rho"] / first).add_(grad, alpha=1.0 - group["rho"])
        if group["proj_method"] == "svd":
            use_left, use_right = projection_sides(grad.shape, group["proj_type"])
            new = singular_basis(target, group["rank"], use_left=use_left, use_right=use_right)
        else:
            new = power_iteration_step(target, old)
        for key, factor in (("proj_left", new.left), ("proj_right", new.right)):
            if factor is not None:
                state[key] = factor


def rotate_moments_with_variance_correction(
    state: dict, group: Mapping[str, Any], c_left: torch.Tensor | None, c_right: torch.Tensor | None
) -> None:
    """``M' = C M``; ``V' = |(C o C)(V / b2 - M^2 / b1^2) + M'^2 / b1^2| * b2`` (see module docstring)."""
    if "exp_avg" not in state:
        return
    first, second = bias_corrections(state, group)
    momentum, second_moment = state["exp_avg"], state["exp_avg_sq"]
    rotated = change_coordinates(momentum, c_left, c_right)
    variance = second_moment / second - momentum * momentum / first**2
    carried = change_coordinates(variance, c_left, c_right, squared=True) + rotated * rotated / first**2
    state["exp_avg"] = rotated
    state["exp_avg_sq"] = carried.mul_(second).abs_()


@OPTIMIZERS.register(
    "ldadam",
    family="power_iteration",
    paper="LDAdam: Adaptive Optimization from Low-Dimensional Gradient Statistics",
    arxiv="2410.16103",
    supports=("layerwise", "ddp", "fsdp2"),
)
class LDAdamW(LowRankAdamW):
    """LDAdam with decoupled weight decay: a group is projected iff it has ``rank``.

    ``LDAdamW(params, lr=1e-3, betas=(0.908, 0.99), eps=1e-8, weight_decay=0.0, correct_bias=True)``;
    group keys ``rank``, ``rho``, ``proj_type`` (std / reverse_std / left / right),
    ``proj_method`` (power_iteration / svd), ``error_feedback``, ``update_proj_gap``,
    ``scale``, ``moment_policy`` (default ``rotate``).
    """

    projector = PowerIterationProjector()
    update_rule = ErrorFeedback()
    HYPERPARAMETERS = with_defaults(ADAM, betas=(0.908, 0.99), eps=1e-8)
    OPTIONS = {
        **without(with_defaults(SUBSPACE, rank=16, update_proj_gap=1, scale=1.0, moment_policy="rotate"),
                  "bias_correction"),
        "proj_type": Option("std", str, choices=ONE_SIDED, help="projected side (LDAdamW projects one side only)"),
        "rho": Option(0.908, float, low=0, high=1, high_open=True,
                      help="weight of the momentum in the subspace target rho M + (1 - rho) G"),
        "proj_method": Option("power_iteration", str, choices=PROJ_METHODS,
                              help="one warm-started block power iteration per refresh, or an exact SVD (ablation)"),
        "error_feedback": Option(True, bool, help="feed what the compression drops into the next gradient (m x n)"),
    }

    def prepare_gradient(self, grad: torch.Tensor, state: dict, group: Mapping[str, Any]) -> torch.Tensor:
        """``G_t + E``: the stored error joins the gradient (and leaves the state until the rule
        writes the new one)."""
        return add_error(grad, state, group)

    def switch_moments(self, state: dict, group: Mapping[str, Any], old: Basis, new: Basis) -> None:
        """The paper's projection-aware rotation with variance correction (``rotate``), or the
        base policies; with error feedback the momentum the switch loses joins the error."""
        momentum_before = None
        if group["error_feedback"] and "exp_avg" in state:
            momentum_before = old.project_back(state["exp_avg"])
        if group["moment_policy"] == "rotate":
            rotate_moments_with_variance_correction(state, group, *old.transition(new))
        else:
            super().switch_moments(state, group, old, new)
        if momentum_before is not None:
            if "exp_avg" in state:
                momentum_before.sub_(new.project_back(state["exp_avg"]))
            beta1 = group["betas"][0]
            lost = momentum_before.mul_(beta1 / (1.0 - beta1))
            state[ERROR_KEY] = state[ERROR_KEY].add_(lost) if ERROR_KEY in state else lost
