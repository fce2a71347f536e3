"""GradNormLoRP: weight-normalised weights with a GaLore-projected direction (``gradnorm_lorp``,
:class:`GradNormLoRPAdamW`).

Paper: Huang, Shen, Zhu, Rudinac, Kanoulas, "Gradient Weight-normalized Low-rank Projection
for Efficient LLM Training", AAAI 2025, arXiv 2412.19616.

Each targeted weight ``W`` (``m x n``, ``nn.Linear``'s out x in) is trained in the
weight-normalised parametrisation of Salimans & Kingma (arXiv 1602.07868), one magnitude per
output unit (row)::

    W_i = g_i v_i / ||v_i||                              (g: m magnitudes, v: m x n directions)
    dL/dg_i = <G_i, u_i>,   u_i = v_i / ||v_i||          (G = dL/dW)
    dL/dv_i = (g_i / ||v_i||) (G_i - <G_i, u_i> u_i)     (orthogonal to v_i)
    v  <- v - lr_t * scale * P Adam(P^T dL/dv Q)         (GaLore on the direction: P, Q from the SVD
                                                          of dL/dv every T steps, on the sides of proj_type)
    g  <- g - lr_t * Adam(dL/dg)                          (full Adam on the m magnitudes)
    W  <- g v / ||v|| (row-wise) ;  W -= lr * weight_decay * W
    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)

How this relates to the paper's formulation. The paper writes the weight as
``W = M (W_0 + I J) / ||W_0 + I J||_c`` and the direction's update as the projected
``U_t eta_t(U_t^T D_t V_t) V_t^T``:

- ``||.||_c`` is the norm of each column of ``W`` in the paper's ``d x k`` layout, i.e. of the
  weights of one output unit, which is a row of ``nn.Linear``'s ``out x in`` weight (the
  convention of DoRA, and the released code's ``dim=1``): the magnitudes here are per row.
- ``W_0 + I J`` is the direction ``v``: it starts at the pretrained ``W_0`` and moves by
  low-rank steps. rankwise keeps ``v`` implicit (below) and updates it by the projected Adam
  step, so within a refresh window its change is rank ``r``, as ``I J``; the factors ``I, J``
  themselves are not stored.
- The paper's projection is two-sided (``U^T D V``): that is ``proj_type="full"``. The
  default ``std`` projects one side, as the released code (GaLore's projector) and the state
  formula ``2nr + mr + 2m`` below; both are offered.

The reparametrisation lives inside the optimizer (the :meth:`~GradNormLoRPAdamW.reparametrise`
and :meth:`~GradNormLoRPAdamW.write_back` hooks of the sealed step), so the model keeps its
``nn.Linear`` weights and ``build(model, "gradnorm_lorp", ...)`` works like every other
optimizer: ``v`` is never stored, because ``W`` and the state determine it exactly,
``v_i = ||v_i|| u_i`` with ``u_i = sign(g_i) W_i / ||W_i||``; the state keeps ``g``
(``magnitude``, re-read from the row norms of ``W`` at every step and after the weight decay,
so any change of ``W`` between steps is respected) and ``||v||`` (``direction_norm``). At the
first step ``v = W`` and ``g = ||W_i||``.

State per ``m x n`` weight (``m <= n``, std): Adam moments of ``P^T dL/dv`` (``2 r n``), the
basis (``m r``), the moments of ``g`` (``2 m``) -- the paper's ``2nr + mr + 2m`` -- plus ``g``
and ``||v||`` (``2 m``), which the paper counts as model parameters: ``2nr + mr + 4m`` in all.

Deviations from the paper / its released code:
- The released code keeps full-size Adam moments of ``G`` besides the projected ones and
  never writes ``g v / ||v||`` back into the weight; this implements the paper's method.
- A row of ``W`` that is exactly zero has no direction and stays zero.
- Weight decay is decoupled and applied to ``W`` (hence to ``g``) after the update.
- Defaults: GaLore's ``scale`` 0.25, ``update_proj_gap`` 200, ``proj_type`` std,
  ``moment_policy`` ``keep``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import SUBSPACE
from rankwise.optim.pieces import Reparametrised
from rankwise.optim.projectors import REFRESH, SVDProjector
from rankwise.optim.rules import DropResidual

NORM_GUARD = 1e-12  # keeps u = W / g finite on an all-zero row (whose direction is then zero)


def weight_norm_gradients(
    grad: torch.Tensor, unit: torch.Tensor, magnitude: torch.Tensor, direction_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dg, dL/dv)`` of ``W_i = g_i v_i / ||v_i||`` from ``G = dL/dW`` and ``u = v / ||v||``."""
    magnitude_grad = (grad * unit).sum(dim=1)
    direction_grad = (grad - magnitude_grad[:, None] * unit) * (magnitude / direction_norm)[:, None]
    return magnitude_grad, direction_grad


@dataclass
class WeightNormalised(Reparametrised):
    """The direction ``v`` (``tensor``) with ``dL/dv`` (``grad``), and the magnitude ``g`` with ``dL/dg``."""

    magnitude: torch.Tensor
    magnitude_grad: torch.Tensor


@OPTIMIZERS.register(
    "gradnorm_lorp",
    family="galore",
    paper="Gradient Weight-normalized Low-rank Projection for Efficient LLM Training",
    arxiv="2412.19616",
    supports=("layerwise", "ddp", "fsdp2"),
)
class GradNormLoRPAdamW(LowRankAdamW):
    """Weight-normalised AdamW with GaLore on the direction; a group is projected iff it has ``rank``.

    ``GradNormLoRPAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True)``;
    group keys as GaLore's: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``,
    ``moment_policy``, ``bias_correction``.
    """

    projector = SVDProjector()
    update_rule = DropResidual()
    OPTIONS = {**SUBSPACE, **REFRESH}
    #: an all-zero weight has no direction and never moves (rankwise.optim.build refuses it)
    zero_weights_stay_zero = True

    def reparametrise(
        self, weight: torch.Tensor, grad: torch.Tensor, state: dict, group: Mapping[str, Any]
    ) -> WeightNormalised:
        """``v = ||v|| u`` (``u = sign(g) W / ||W||`` row-wise) and the gradients of ``v`` and ``g``."""
        row_norms = torch.linalg.vector_norm(weight, dim=1)
        sign = torch.sign(state["magnitude"]) if "magnitude" in state else torch.ones_like(row_norms)
        sign[sign == 0] = 1
        magnitude = sign * row_norms
        direction_norm = state["direction_norm"] if "direction_norm" in state else row_norms.clamp_min(NORM_GUARD)
        unit = weight / (magnitude[:, None] + sign[:, None] * NORM_GUARD)
        magnitude_grad, direction_grad = weight_norm_gradients(grad, unit, magnitude, direction_norm)
        return WeightNormalised(unit * direction_norm[:, None], direction_grad, magnitude, magnitude_grad)

    def write_back(self, weight: torch.Tensor, trained: WeightNormalised, state: dict,
                   group: Mapping[str, Any]) -> None:
        """Adam on ``g``, then ``W = g v / ||v||`` from the updated direction."""
        magnitude_state = {"step": state["step"]}  # g's moments are never reset: their age is the step count
        if "magnitude_exp_avg" in state:
            magnitude_state.update(exp_avg=state["magnitude_exp_avg"], exp_avg_sq=state["magnitude_exp_avg_sq"])
        magnitude_step, magnitude_rate = self.inner.update(magnitude_state, trained.magnitude_grad, group)
        state["magnitude_exp_avg"] = magnitude_state["exp_avg"]
        state["magnitude_exp_avg_sq"] = magnitude_state["exp_avg_sq"]
        magnitude = trained.magnitude - magnitude_rate * magnitude_step
        direction_norm = torch.linalg.vector_norm(trained.tensor, dim=1).clamp_min(NORM_GUARD)
        weight.copy_(trained.tensor * (magnitude / direction_norm)[:, None])
        state["magnitude"] = magnitude
        state["direction_norm"] = direction_norm

    def after_update(self, param: torch.Tensor, weight: torch.Tensor, state: dict, group: Mapping[str, Any]) -> None:
        """``g`` re-read from ``W``'s row norms (its sign kept) after the decoupled weight decay."""
        if group["weight_decay"] > 0.0:
            sign = torch.sign(state["magnitude"])
            sign[sign == 0] = 1
            state["magnitude"] = sign * torch.linalg.vector_norm(weight, dim=1)
