"""GaLore with 8-bit blockwise-quantised Adam moments (``galore8bit``, :class:`GaLoreAdamW8bit`).

Papers: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507 (the projection, Algorithm 2, and its 8-bit variant), with
the moments stored as in Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861.

The projection is GaLore's (see :mod:`rankwise.optim.galore`); only the inner Adam differs.
Its moments live between steps as uint8 codes with one float32 absmax per block of 256
(:func:`rankwise.linalg.quant.blockwise_quantize`): the first moment on the signed dynamic
map, the square root of the second moment on the unsigned one. Each step::

    M = deq(M_codes, M_absmax) ;  V = deq(S_codes, S_absmax)^2        (float)
    M = b1 M + (1 - b1) R_t ;  V = b2 V + (1 - b2) R_t^2
    N_t = M / (sqrt(V) + eps)                   (from the float moments, before requantising)
    M_codes, M_absmax = q(M) ;  S_codes, S_absmax = q(sqrt(V))
    W -= lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * (P N_t  or  N_t Q^T)

so the first step equals fp32 GaLore's exactly and later steps differ by the moments'
quantisation error (at most 0.7 % of a block's absmax; ~2 significant digits per decade).
Storing ``sqrt(V)`` rather than ``V`` (bitsandbytes quantises ``V`` itself) halves the
number of decades the map must cover: with ``V`` on the map, a coordinate whose gradient is
1e-4 of its block's largest has ``V`` below the map's 1e-7 floor, rounds to 0, and takes a
step ~``M / eps`` -- we measured steps 15x too large on the sparse rows of an embedding. With ``sqrt(V)``
the per-step direction error on the tiny LLaMA's projected gradients is ~2-3 %, as with
bitsandbytes' maps.
Like bitsandbytes, moments of tensors with fewer than ``min_8bit_size`` (4096) numbers
stay float32 (there the per-block absmax would cost more than it saves); unprojected
parameters run the same 8-bit Adam on their full gradient.

State per ``m x n`` weight (``std``, ``N = r max(m, n) >= min_8bit_size``): ``2 N`` bytes of
codes + ``8 ceil(N / 256)`` bytes of absmax + the fp32 basis ``4 r min(m, n)`` -- the
moments take ~4x less than GaLoreAdamW's. The two codebooks (1 KiB each per device) are
constants of the scheme, outside the optimizer state.

Deviations from the reference (galore-torch 1.0's ``GaLoreAdamW8bit`` on bitsandbytes):
- The codebooks follow the paper's dynamic-tree description (our own construction,
  :mod:`rankwise.linalg.quant`); bitsandbytes' tables differ in the exact code values, and
  the second moment is stored as its square root (above), so trajectories agree to the
  quantisation error, not bit for bit.
- Adam's eps is added to ``sqrt(V)`` (GaLore / HF form) rather than to the bias-corrected
  ``sqrt(V_hat)`` (bitsandbytes); the difference is ``O(eps)``.
- Weight decay is decoupled and applied after the step for every group (bitsandbytes
  applies it before the update for unprojected parameters); no percentile clipping.
- Runs on CPU and CUDA in plain PyTorch; all state is tensors (``weights_only`` loads).
- ``moment_policy`` (keep / reset / rotate; default keep, as GaLore): ``rotate``
  dequantises, changes coordinates and requantises.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from rankwise.errors import RankwiseError
from rankwise.linalg.quant import blockwise_dequantize, blockwise_quantize
from rankwise.optim.core import OPTIMIZERS, AdamMoments, DropResidual, InnerOptimizer, LowRankAdamW, SVDProjector

BLOCK_SIZE = 256  # bitsandbytes' block for 8-bit optimizer states
DEFAULT_MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep float32 moments

# (state key prefix, signed codebook?) of the stored moments: m, and sqrt(v) (see module docstring)
_STORED = (("exp_avg", True), ("exp_avg_sq_root", False))


class QuantizedAdamMoments(InnerOptimizer):
    """:class:`AdamMoments` whose moments are stored as 8-bit blockwise codes between steps.

    State keys ``exp_avg_codes`` / ``exp_avg_absmax`` (first moment) and
    ``exp_avg_sq_root_codes`` / ``exp_avg_sq_root_absmax`` (square root of the second);
    tensors with fewer than ``group["min_8bit_size"]`` numbers keep
    AdamMoments' float ``exp_avg`` / ``exp_avg_sq``.
    """

    float_adam = AdamMoments()

    def update(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
        if grad.numel() < group["min_8bit_size"]:
            return self.float_adam.update(state, grad, group)
        moments = {"step": state["step"], "moment_origin": state.get("moment_origin", 0)}
        moments.update(self._dequantized(state, grad.dtype))
        direction, step_size = self.float_adam.update(moments, grad, group)
        self._store(state, moments)
        return direction, step_size

    def reset(self, state: dict) -> None:
        self.float_adam.reset(state)
        for key, _ in _STORED:
            state.pop(f"{key}_codes", None)
            state.pop(f"{key}_absmax", None)

    def rotate(self, state: dict, c_left: torch.Tensor | None, c_right: torch.Tensor | None) -> None:
        if "exp_avg_codes" not in state:
            self.float_adam.rotate(state, c_left, c_right)
            return
        dtype = next(c.dtype for c in (c_left, c_right) if c is not None)  # the basis' dtype
        moments = self._dequantized(state, dtype)
        self.float_adam.rotate(moments, c_left, c_right)
        self._store(state, moments)

    @staticmethod
    def _dequantized(state: Mapping[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if "exp_avg_codes" not in state:
            return {}
        exp_avg, exp_avg_sq_root = (
            blockwise_dequantize(state[f"{key}_codes"], state[f"{key}_absmax"], signed=signed, block_size=BLOCK_SIZE)
            for key, signed in _STORED
        )
        return {"exp_avg": exp_avg.to(dtype), "exp_avg_sq": exp_avg_sq_root.square().to(dtype)}

    @staticmethod
    def _store(state: dict, moments: Mapping[str, torch.Tensor]) -> None:
        stored = (moments["exp_avg"], moments["exp_avg_sq"].sqrt())
        for (key, signed), value in zip(_STORED, stored):
            codes, absmax = blockwise_quantize(value, signed=signed, block_size=BLOCK_SIZE)
            state[f"{key}_codes"], state[f"{key}_absmax"] = codes, absmax


def _check_min_8bit_size(value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise RankwiseError(
            f"min_8bit_size must be an integer >= 0 (tensors with fewer numbers keep float32 moments), got {value!r}"
        )


class GaLoreAdamW8bit(LowRankAdamW):
    """Drop-in for ``galore_torch.GaLoreAdamW8bit``: a group is projected iff it has ``rank``.

    ``GaLoreAdamW8bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    min_8bit_size=4096)`` -- bitsandbytes' AdamW8bit defaults. ``min_8bit_size`` applies to
    every group that does not set its own.
    """

    projector = SVDProjector()
    inner = QuantizedAdamMoments()
    residual = DropResidual()
    method_defaults = {
        "rank": 128,
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
        "moment_policy": "keep",
        "min_8bit_size": DEFAULT_MIN_8BIT_SIZE,
    }

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        correct_bias: bool = True,
        min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
        *,
        param_names: Mapping[int, str] | None = None,
    ) -> None:
        _check_min_8bit_size(min_8bit_size)
        self._min_8bit_size = min_8bit_size  # read by add_param_group, which torch calls from __init__
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, param_names=param_names)

    @classmethod
    def from_parameters(
        cls, projected: Sequence[tuple[str, torch.Tensor]], others: Sequence[torch.Tensor], *, lr: float, **hparams: Any
    ) -> "GaLoreAdamW8bit":
        """As :meth:`LowRankAdamW.from_parameters`; ``min_8bit_size`` applies to both groups."""
        optimizer = super().from_parameters(projected, others, lr=lr, **hparams)
        if "min_8bit_size" in hparams:  # validated with group 0; nothing has been stepped yet
            for group in optimizer.param_groups:
                group["min_8bit_size"] = hparams["min_8bit_size"]
        return optimizer

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        group.setdefault("min_8bit_size", self._min_8bit_size)
        _check_min_8bit_size(group["min_8bit_size"])
        super().add_param_group(group)


OPTIMIZERS.register(
    "galore8bit",
    family="galore",
    paper="GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    arxiv="2403.03507",
)(GaLoreAdamW8bit.from_parameters)
