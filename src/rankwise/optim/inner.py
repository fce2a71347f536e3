"""Inner optimizers several methods share: Adam on the (projected) gradient, in float or 8-bit.

:class:`AdamMoments` (Kingma & Ba, arXiv 1412.6980) in the bias-correction form of GaLore /
HF AdamW::

    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    direction = m / (sqrt(v) + eps)
    step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)     (lr when correct_bias is False)

``t`` counts steps since the moments started (``state["step"] - state["moment_origin"]``;
the origin moves only under the ``reset`` policy). Moments have the gradient's dtype.

Per-coordinate bias correction (group key ``bias_correction="per_coordinate"``). After a
``rotate`` switch, a coordinate new to the subspace starts with (nearly) zero moments while
``t`` keeps counting, so its update ``m / sqrt(v)`` is ``(1 - b1^k) / sqrt(1 - b2^k)`` times a
fresh start's after ``k`` steps: up to ~6.5x for the default betas, still 2.4x after 200
steps. The option tracks, per subspace coordinate, the weight of history its moments carry::

    w1 = b1 w1 + (1 - b1) ;  w2 = b2 w2 + (1 - b2)       (every step; w = 1 - b^t without switches)
    at a rotate switch:  w <- (C o C) w                    (the energy each new coordinate draws
                                                            from the old ones; exact for 0/1 C)
    direction = m / (sqrt(v) + eps) * [sqrt(w2) / w1] / [sqrt(1 - b2^t) / (1 - b1^t)]

so the update of a coordinate that was in the subspace all along is unchanged and a new one
is corrected like a fresh start. The weights (``exp_avg_weight`` / ``exp_avg_sq_weight``, one
number per subspace coordinate: ``r`` for a one-sided basis) exist only after the first
rotate switch; before it the option changes nothing.

``update_many`` / ``step_many`` run the same formula for several parameters with torch's
multi-tensor (``_foreach``) kernels, one launch per bucket of equal device, dtype and moment
age, as ``torch.optim.AdamW(foreach=True)`` does.

:class:`QuantizedAdamMoments` stores the same moments as 8-bit blockwise codes between steps
(Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861; see
:mod:`rankwise.linalg.quant`): the first moment on the signed dynamic map, the square root of
the second on the unsigned one. Each step dequantises, runs :class:`AdamMoments` in float
(so the direction comes from the float moments) and requantises. Storing ``sqrt(v)`` rather
than ``v`` (bitsandbytes quantises ``v`` itself) halves the number of decades the map must
cover: with ``v`` on the map, a coordinate whose gradient is 1e-4 of its block's largest has
``v`` below the map's 1e-7 floor, rounds to 0, and takes a step ~``m / eps`` -- we measured
steps 15x too large on the sparse rows of an embedding. Tensors with fewer than
``min_8bit_size`` numbers keep float moments (bitsandbytes' rule: there the per-block absmax
would cost more than it saves).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from rankwise.linalg.projections import change_coordinates
from rankwise.linalg.quant import blockwise_dequantize, blockwise_quantize
from rankwise.optim.options import ADAM, with_defaults
from rankwise.optim.pieces import InnerOptimizer
from rankwise.options import Option

BLOCK_SIZE = 256  # bitsandbytes' block for 8-bit optimizer states
DEFAULT_MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep float32 moments

#: the hyperparameters of the 8-bit optimizers: bitsandbytes' AdamW8bit defaults (eps 1e-8,
#: weight decay 0.01) and its size threshold
ADAM_8BIT = {
    **with_defaults(ADAM, eps=1e-8, weight_decay=1e-2),
    "min_8bit_size": Option(
        DEFAULT_MIN_8BIT_SIZE, int, low=0, help="tensors with fewer numbers keep float32 moments (bitsandbytes' rule)"
    ),
}

WEIGHT_KEYS = ("exp_avg_weight", "exp_avg_sq_weight")  # per-coordinate history weights w1, w2
# (state key prefix, signed codebook?) of the stored 8-bit moments: m, and sqrt(v)
_STORED = (("exp_avg", True), ("exp_avg_sq_root", False))


def bias_corrections(state: Mapping[str, Any], group: Mapping[str, Any]) -> tuple[float, float]:
    """``(1 - beta1^k, 1 - beta2^k)`` for the ``k`` steps the moments have seen (1, 1 without correction)."""
    if not group["correct_bias"]:
        return 1.0, 1.0
    steps = state["step"] - state.get("moment_origin", 0)
    beta1, beta2 = group["betas"]
    return 1.0 - beta1**steps, 1.0 - beta2**steps


class AdamMoments(InnerOptimizer):
    """Adam in the form of the module docstring; moments ``exp_avg`` / ``exp_avg_sq``."""

    moment_keys = ("exp_avg", "exp_avg_sq")

    def update(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        direction = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            first, second = bias_corrections(state, group)
            step_size = step_size * math.sqrt(second) / first
            if WEIGHT_KEYS[0] in state:
                direction.mul_(self._relative_correction(state, group, first, second))
        return direction, step_size

    def _multi_tensor(self, states: Sequence[dict]) -> bool:
        """Whether the multi-tensor kernels compute exactly :meth:`update` here: this class's
        own ``update`` (not a subclass's variant) and no per-coordinate history weights."""
        return type(self).update is AdamMoments.update and not any(WEIGHT_KEYS[0] in st for st in states)

    def _foreach_moments(
        self, states: Sequence[dict], grads: Sequence[torch.Tensor], group: Mapping[str, Any]
    ) -> list[tuple[list[int], list[torch.Tensor], list[torch.Tensor], float]]:
        """The moment update of :meth:`update` with torch's ``_foreach`` kernels, one launch per
        bucket of parameters sharing device, dtype and moment age; per bucket
        ``(indices, exp_avgs, sqrt(v) + eps, step_size)``."""
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[int]] = {}
        for index, (state, grad) in enumerate(zip(states, grads)):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            age = state["step"] - state.get("moment_origin", 0)
            buckets.setdefault((grad.device, grad.dtype, age), []).append(index)
        result = []
        for members in buckets.values():
            exp_avgs = [states[i]["exp_avg"] for i in members]
            exp_avg_sqs = [states[i]["exp_avg_sq"] for i in members]
            chosen = [grads[i] for i in members]
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, chosen, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, chosen, chosen, value=1.0 - beta2)
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denominators, group["eps"])
            step_size = group["lr"]
            if group["correct_bias"]:
                first, second = bias_corrections(states[members[0]], group)
                step_size = step_size * math.sqrt(second) / first
            result.append((members, exp_avgs, denominators, step_size))
        return result

    def update_many(
        self, states: Sequence[dict], grads: Sequence[torch.Tensor], group: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, float]]:
        """:meth:`update` of several parameters with multi-tensor kernels (as ``torch.optim.AdamW(foreach=True)``)."""
        if not self._multi_tensor(states):
            return super().update_many(states, grads, group)
        result: list[tuple[torch.Tensor, float] | None] = [None] * len(states)
        for members, exp_avgs, denominators, step_size in self._foreach_moments(states, grads, group):
            for index, direction in zip(members, torch._foreach_div(exp_avgs, denominators)):
                result[index] = (direction, step_size)
        return result  # type: ignore[return-value]

    def step_many(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict],
        group: Mapping[str, Any],
    ) -> None:
        """``W -= step_size * m / (sqrt(v) + eps)`` in place for several parameters. A division then
        an add (not the fused ``_foreach_addcdiv_``, which rounds differently), so the result is
        bitwise the per-tensor :meth:`update`'s."""
        if not self._multi_tensor(states):
            super().step_many(params, grads, states, group)
            return
        for members, exp_avgs, denominators, step_size in self._foreach_moments(states, grads, group):
            directions = torch._foreach_div(exp_avgs, denominators)
            torch._foreach_add_([params[i] for i in members], directions, alpha=-step_size)

    @staticmethod
    def _relative_correction(state: dict, group: Mapping[str, Any], first: float, second: float) -> torch.Tensor:
        """``[sqrt(w2) / w1] / [sqrt(1 - b2^t) / (1 - b1^t)]`` after updating the weights ``w``."""
        beta1, beta2 = group["betas"]
        weight1, weight2 = (state[key] for key in WEIGHT_KEYS)
        weight1.mul_(beta1).add_(1.0 - beta1)
        weight2.mul_(beta2).add_(1.0 - beta2)
        return weight2.sqrt().div(weight1).mul_(first / math.sqrt(second))

    def reset(self, state: dict) -> None:
        for key in (*self.moment_keys, *WEIGHT_KEYS):
            state.pop(key, None)

    def rotate(self, state: dict, c_left: torch.Tensor | None, c_right: torch.Tensor | None,
               group: Mapping[str, Any]) -> None:
        """``m <- C_L m C_R``, ``v <- (C_L o C_L) v (C_R o C_R)``; under ``bias_correction=
        "per_coordinate"`` the history weights too (created at the first switch from the global correction)."""
        if "exp_avg" not in state:
            return
        if group.get("bias_correction") == "per_coordinate" and group["correct_bias"]:
            if WEIGHT_KEYS[0] not in state:
                self._start_weights(state, group, c_left, c_right)
            for key in WEIGHT_KEYS:
                state[key] = change_coordinates(state[key], c_left, c_right, squared=True)
        state["exp_avg"] = change_coordinates(state["exp_avg"], c_left, c_right)
        state["exp_avg_sq"] = change_coordinates(state["exp_avg_sq"], c_left, c_right, squared=True)

    @staticmethod
    def _start_weights(state: dict, group: Mapping[str, Any], c_left: torch.Tensor | None,
                       c_right: torch.Tensor | None) -> None:
        moment = state["exp_avg"]
        rows = moment.shape[0] if c_left is not None else 1
        cols = moment.shape[-1] if c_right is not None else 1
        shape = (rows, cols) if moment.ndim == 2 else (moment.shape[0],)
        work = torch.promote_types(moment.dtype, torch.float32)
        for key, correction in zip(WEIGHT_KEYS, bias_corrections(state, group)):
            state[key] = torch.full(shape, correction, dtype=work, device=moment.device)


class QuantizedAdamMoments(InnerOptimizer):
    """:class:`AdamMoments` whose moments are stored as 8-bit blockwise codes between steps.

    State keys ``exp_avg_codes`` / ``exp_avg_absmax`` (first moment) and
    ``exp_avg_sq_root_codes`` / ``exp_avg_sq_root_absmax`` (square root of the second);
    tensors with fewer than ``group["min_8bit_size"]`` numbers keep AdamMoments' float
    ``exp_avg`` / ``exp_avg_sq``. Per-coordinate history weights stay float (``r`` numbers).
    """

    float_adam = AdamMoments()

    def update(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
        if grad.numel() < group["min_8bit_size"]:
            return self.float_adam.update(state, grad, group)
        moments = self._float_view(state, grad.dtype)
        direction, step_size = self.float_adam.update(moments, grad, group)
        self._store(state, moments)
        return direction, step_size

    def reset(self, state: dict) -> None:
        self.float_adam.reset(state)
        for key, _ in _STORED:
            state.pop(f"{key}_codes", None)
            state.pop(f"{key}_absmax", None)

    def rotate(self, state: dict, c_left: torch.Tensor | None, c_right: torch.Tensor | None,
               group: Mapping[str, Any]) -> None:
        if "exp_avg_codes" not in state:
            self.float_adam.rotate(state, c_left, c_right, group)
            return
        dtype = next(c.dtype for c in (c_left, c_right) if c is not None)  # the basis' dtype
        moments = self._float_view(state, dtype)
        self.float_adam.rotate(moments, c_left, c_right, group)
        self._store(state, moments)

    @staticmethod
    def _float_view(state: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """The float moments (dequantised) plus the counters and weights AdamMoments reads."""
        view = {key: state[key] for key in ("step", "moment_origin", *WEIGHT_KEYS) if key in state}
        if "exp_avg_codes" in state:
            exp_avg, exp_avg_sq_root = (
                blockwise_dequantize(state[f"{key}_codes"], state[f"{key}_absmax"], signed=signed,
                                     block_size=BLOCK_SIZE)
                for key, signed in _STORED
            )
            view.update(exp_avg=exp_avg.to(dtype), exp_avg_sq=exp_avg_sq_root.square().to(dtype))
        return view

    @staticmethod
    def _store(state: dict, view: Mapping[str, Any]) -> None:
        stored = (view["exp_avg"], view["exp_avg_sq"].sqrt())
        for (key, signed), value in zip(_STORED, stored):
            codes, absmax = blockwise_quantize(value, signed=signed, block_size=BLOCK_SIZE)
            state[f"{key}_codes"], state[f"{key}_absmax"] = codes, absmax
        for key in WEIGHT_KEYS:
            if key in view:
                state[key] = view[key]
