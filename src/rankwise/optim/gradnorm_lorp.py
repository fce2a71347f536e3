"""GradNormLoRP: weight-normalised weights with a GaLore-projected direction (``gradnorm_lorp``,
:class:`GradNormLoRPAdamW`).

Paper: Huang, Shen, Zhu, Rudinac, Kanoulas, "Gradient Weight-normalized Low-rank Projection
for Efficient LLM Training", AAAI 2025, arXiv 2412.19616.

Each targeted weight ``W`` (``m x n``) is trained in the weight-normalised parametrisation
of Salimans & Kingma (arXiv 1602.07868), one magnitude per row::

    W_i = g_i v_i / ||v_i||                              (g: m magnitudes, v: m x n directions)
    dL/dg_i = <G_i, u_i>,   u_i = v_i / ||v_i||          (G = dL/dW)
    dL/dv_i = (g_i / ||v_i||) (G_i - <G_i, u_i> u_i)     (orthogonal to v_i)
    v  <- v - lr_t * scale * P Adam(P^T dL/dv)           (GaLore on the direction: P from the SVD
                                                          of dL/dv every T steps, std orientation)
    g  <- g - lr_t * Adam(dL/dg)                          (full Adam on the m magnitudes)
    W  <- g v / ||v|| (row-wise) ;  W -= lr * weight_decay * W
    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)

The reparametrisation lives inside the optimizer, so the model keeps its ``nn.Linear``
weights and ``build(model, "gradnorm_lorp", ...)`` works like every other optimizer: ``v``
is never stored, because ``W`` and the state determine it exactly,
``v_i = ||v_i|| u_i`` with ``u_i = sign(g_i) W_i / ||W_i||``; the state keeps ``g``
(``magnitude``, re-synchronised with the row norms of ``W`` at every step, so weight decay or
any other change of ``W`` between steps is respected) and ``||v||`` (``direction_norm``).
At the first step ``v = W`` and ``g = ||W_i||``.

State per ``m x n`` weight (``m <= n``, std): Adam moments of ``P^T dL/dv`` (``2 r n``), the
basis (``m r``), the moments of ``g`` (``2 m``) -- the paper's ``2nr + mr + 2m`` -- plus ``g``
and ``||v||`` (``2 m``), which the paper counts as model parameters: ``2nr + mr + 4m`` in all.

Deviations from the paper / its released code:
- The released code keeps full-size Adam moments of ``G`` besides the projected ones and
  never writes ``g v / ||v||`` back into the weight; this implements the paper's method.
- The magnitude is per row (the released code's ``dim=1``); a row of ``W`` that is exactly
  zero has no direction and stays zero.
- Weight decay is decoupled and applied to ``W`` (hence to ``g``) after the update.
- Defaults: GaLore's ``scale`` 0.25, ``update_proj_gap`` 200, ``moment_policy`` ``keep``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from rankwise.optim.core import OPTIMIZERS, DropResidual, LowRankAdamW, SVDProjector
from rankwise.optim.distributed import is_dtensor
from rankwise.optim.numerics import gradient_is_finite

NORM_GUARD = 1e-12  # keeps u = W / g finite on an all-zero row (whose direction is then zero)


def weight_norm_gradients(
    grad: torch.Tensor, unit: torch.Tensor, magnitude: torch.Tensor, direction_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dg, dL/dv)`` of ``W_i = g_i v_i / ||v_i||`` from ``G = dL/dW`` and ``u = v / ||v||``."""
    magnitude_grad = (grad * unit).sum(dim=1)
    direction_grad = (grad - magnitude_grad[:, None] * unit) * (magnitude / direction_norm)[:, None]
    return magnitude_grad, direction_grad


class GradNormLoRPAdamW(LowRankAdamW):
    """Weight-normalised AdamW with GaLore on the direction; a group is projected iff it has ``rank``.

    ``GradNormLoRPAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True)``;
    group keys as GaLore's: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``moment_policy``.
    """

    projector = SVDProjector()
    residual = DropResidual()
    method_defaults = {
        "rank": 128,
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
        "moment_policy": "keep",
    }

    @torch.no_grad()
    def step_parameter(
        self,
        param: torch.Tensor,
        group: Mapping[str, Any],
        *,
        weight: torch.Tensor | None = None,
        grad: torch.Tensor | None = None,
    ) -> None:
        """Unprojected groups and FSDP2 shards as :meth:`LowRankAdamW.step_parameter`; a projected
        weight takes the weight-normalised step of the module docstring."""
        if "rank" not in group or (weight is None and is_dtensor(param)):
            super().step_parameter(param, group, weight=weight, grad=grad)
            return
        weight = param if weight is None else weight
        grad = param.grad if grad is None else grad
        if not gradient_is_finite(grad):
            super().step_parameter(param, group, weight=weight, grad=grad)  # warns and skips
            return
        state = self.state[param]
        row_norms = torch.linalg.vector_norm(weight, dim=1)
        sign = torch.sign(state["magnitude"]) if "magnitude" in state else torch.ones_like(row_norms)
        sign[sign == 0] = 1
        magnitude = sign * row_norms
        direction_norm = state["direction_norm"] if "direction_norm" in state else row_norms.clamp_min(NORM_GUARD)
        unit = weight / (magnitude[:, None] + sign[:, None] * NORM_GUARD)
        magnitude_grad, direction_grad = weight_norm_gradients(grad, unit, magnitude, direction_norm)

        direction = unit * direction_norm[:, None]  # v, updated in place by the GaLore step
        steps_before = state.get("step", 0)
        super().step_parameter(param, {**group, "weight_decay": 0.0}, weight=direction, grad=direction_grad)
        if state.get("step", 0) == steps_before:
            return  # the projected step was skipped (no subspace yet): leave W and g alone

        magnitude_state = {"step": state["step"]}
        if "magnitude_exp_avg" in state:
            magnitude_state.update(exp_avg=state["magnitude_exp_avg"], exp_avg_sq=state["magnitude_exp_avg_sq"])
        magnitude_step, magnitude_rate = self.inner.update(magnitude_state, magnitude_grad, group)
        state["magnitude_exp_avg"] = magnitude_state["exp_avg"]
        state["magnitude_exp_avg_sq"] = magnitude_state["exp_avg_sq"]
        magnitude = magnitude - magnitude_rate * magnitude_step
        direction_norm = torch.linalg.vector_norm(direction, dim=1).clamp_min(NORM_GUARD)
        weight.copy_(direction * (magnitude / direction_norm)[:, None])
        if group["weight_decay"] > 0.0:
            weight.mul_(1.0 - group["lr"] * group["weight_decay"])
            magnitude = magnitude * (1.0 - group["lr"] * group["weight_decay"])
        state["magnitude"] = magnitude
        state["direction_norm"] = direction_norm


OPTIMIZERS.register(
    "gradnorm_lorp",
    family="galore",
    paper="Gradient Weight-normalized Low-rank Projection for Efficient LLM Training",
    arxiv="2412.19616",
)(GradNormLoRPAdamW.from_parameters)
