"""Q-GaLore: INT4 projectors, lazy layer-wise subspace refresh, 8-bit Adam, optional INT8
weights (``qgalore``, :class:`QGaLoreAdamW8bit`).

Paper: Zhang, Jaiswal, Yin, Liu, Zhao, Tian, Wang, "Q-GaLore: Quantized GaLore with INT4
Projection and Layer-Adaptive Low-Rank Gradients", arXiv 2407.08296.

On top of GaLore (:mod:`rankwise.optim.galore`) with 8-bit Adam moments
(as :mod:`rankwise.optim.galore8bit`), for a weight ``W`` with gradient ``G_t``:

- **INT4 projector** (``quant=True``, ``quant_n_bit=4``, ``quant_group_size=256``): after
  each SVD the basis ``P`` is stored with grouped min-max codes
  (:func:`rankwise.linalg.quant.minmax_quantize`, two codes per byte) and dequantised on
  use: ``P ~ lo_g + s_g c``, ``|P - P~| <= s_g / 2``. Both the projection ``P~^T G`` and the
  back-projection ``P~ N`` use the dequantised ``P~``.
- **Lazy, layer-adaptive refresh**: at each refresh of a parameter, the first singular
  vector ``u_new`` is compared with the previous one ``u_old`` (the first column of the
  stored, dequantised basis): ``c = |cos(u_old, u_new)|`` enters a sliding window of the
  last ``queue_size`` (5) values. While the window is full and its mean is
  ``>= cos_threshold`` (0.4), every refresh multiplies that parameter's gap by
  ``gamma_proj`` (2): ``T <- int(T * gamma_proj)``. Refreshes fall on the parameter's steps
  ``t`` with ``t % T == 0`` for the current ``T``, as in the reference (``iter %
  update_proj_gap == 0``): after a refresh at step ``s`` the next one is at the first multiple
  of the new ``T`` after ``s`` (e.g. ``T`` 1 -> 2 at step 3: next refresh at 4, not 5). Layers
  whose subspace has settled are re-decomposed exponentially less often.
- **INT8 weights with stochastic rounding** (``weight_quant=True``, ``weight_group_size=256``,
  ``stochastic_round=True``): the projected weights are kept as 8-bit min-max codes.
  After each step the updated float weight ``W' = W - lr * update`` is requantised,
  stochastically (``E[deq(q(W'))] = W'``, so updates smaller than a quantisation step still
  move the weight on average) from a generator seeded by the parameter and the step (a
  resumed run draws the same numbers), and ``W`` is overwritten with ``deq(q(W'))``.
  Under FSDP2 the step runs on the gathered full weight (see
  :mod:`rankwise.optim.distributed`), so the codes are those of single-process training and
  every rank holds them whole, like the low-rank state.

State per ``m x n`` weight (``std``, ``N = r max(m, n)``, ``B = r min(m, n)`` basis numbers,
``g = quant_group_size``): 8-bit moments ``2 N + 8 ceil(N / 256)`` bytes (float32 below
``min_8bit_size``), projector ``ceil(B / 2) + 8 ceil(B / g)`` bytes, the window
``4 queue_size`` bytes; with ``weight_quant`` also ``m n + 8 ceil(m n / weight_group_size)``.

How the model uses INT8 weights: this is Q-GaLore's *simulation* mode (its
``QGaLoreAdamW8bit_simulate``): the parameter tensor keeps the dequantised INT8 values, which
the unchanged ``nn.Linear.forward`` uses, and the codes in ``optimizer.state`` are the INT8
weights. The training trajectory is that of INT8 weights; the memory is not: the float
parameter still exists, so the codes add ``m n`` bytes instead of saving ``3 m n``. Saving it
needs a quantised Linear module that dequantises in forward and backward -- not provided.

Deviations from the reference (q-galore-torch 1.0):
- Any ``proj_type`` (the reference supports ``std`` only); with ``full`` both factors are
  quantised and the left factor's first vector drives the schedule.
- The cosine is taken in absolute value: singular vectors are defined up to sign, so the raw
  cosine would depend on the SVD routine's sign convention. ``u_old`` is the dequantised
  stored vector (the reference keeps an extra float copy).
- Min-max codes store the group minimum as a float instead of an integer zero point.
- INT8 weight quantisation is an optimizer option (group keys ``weight_quant``,
  ``weight_group_size``, ``stochastic_round`` named after the reference's training flags)
  instead of a model-side module; it covers the projected group only.
- 8-bit moments (:class:`rankwise.optim.inner.QuantizedAdamMoments`), eps placement and
  weight decay as in :mod:`rankwise.optim.galore8bit`; all state is tensors / plain values,
  so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from rankwise.errors import RankwiseError
from rankwise.linalg.projections import Basis
from rankwise.linalg.quant import minmax_dequantize, minmax_quantize
from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.inner import ADAM_8BIT, QuantizedAdamMoments
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import SUBSPACE
from rankwise.optim.projectors import REFRESH, SVDProjector
from rankwise.optim.rules import DropResidual
from rankwise.options import Option

_SIDES = ("proj_left", "proj_right")


class QuantizedSVDProjector(SVDProjector):
    """GaLore's SVD projector (any ``refresh`` mode, batched) whose basis is stored with
    ``quant_n_bit`` min-max codes (``proj_*_codes`` / ``proj_*_min`` / ``proj_*_step``; float
    ``proj_*`` when ``quant`` is off), and which records ``|cos|`` between successive first
    singular vectors (``proj_cos_window``, ``proj_cos_count``) and grows ``proj_gap`` (see
    module docstring)."""

    def store(self, state: dict, new: Basis, grad: torch.Tensor, group: Mapping[str, Any]) -> None:
        if self.has_basis(state):
            self._record_alignment(state, group, _first_vector(self.basis(state, grad)), _first_vector(new))
        else:
            state["proj_gap"] = group["update_proj_gap"]
            state["proj_cos_window"] = torch.zeros(group["queue_size"], dtype=torch.float32, device=grad.device)
            state["proj_cos_count"] = 0
        state["proj_rank"] = group["rank"]
        for side, factor in zip(_SIDES, (new.left, new.right)):
            if factor is None:
                continue
            if group["quant"]:
                bits, size = group["quant_n_bit"], group["quant_group_size"]
                codes, low, step = minmax_quantize(factor, bits=bits, group_size=size)
                state.update({f"{side}_codes": codes, f"{side}_min": low, f"{side}_step": step})
                state[f"{side}_bits"], state[f"{side}_group_size"] = bits, size
            else:
                state[side] = factor

    @staticmethod
    def _record_alignment(state: dict, group: Mapping[str, Any], old: torch.Tensor, new: torch.Tensor) -> None:
        cosine = torch.nn.functional.cosine_similarity(old.float(), new.float(), dim=0).abs()
        window = state["proj_cos_window"]
        window[state["proj_cos_count"] % window.numel()] = cosine
        state["proj_cos_count"] += 1
        if state["proj_cos_count"] >= window.numel() and window.mean().item() >= group["cos_threshold"]:
            state["proj_gap"] = int(state["proj_gap"] * group["gamma_proj"])

    def has_basis(self, state: Mapping[str, Any]) -> bool:
        return any(f"{side}_codes" in state or side in state for side in _SIDES)

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> Basis:
        factors = []
        for side, rows in zip(_SIDES, param.shape):
            if side in state:
                factors.append(state[side])
            elif f"{side}_codes" in state:
                factors.append(
                    minmax_dequantize(
                        state[f"{side}_codes"],
                        state[f"{side}_min"],
                        state[f"{side}_step"],
                        bits=state[f"{side}_bits"],
                        group_size=state[f"{side}_group_size"],
                        shape=(rows, state["proj_rank"]),
                        dtype=param.dtype,
                    )
                )
            else:
                factors.append(None)
        return Basis(*factors)


def _first_vector(basis: Basis) -> torch.Tensor:
    return (basis.left if basis.left is not None else basis.right)[:, 0]


@OPTIMIZERS.register(
    "qgalore",
    family="galore",
    paper="Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients",
    arxiv="2407.08296",
    supports=("layerwise", "ddp", "fsdp2"),
)
class QGaLoreAdamW8bit(LowRankAdamW):
    """Drop-in for ``q_galore_torch.QGaLoreAdamW8bit``: a group is projected iff it has ``rank``.

    ``QGaLoreAdamW8bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    min_8bit_size=4096)``; projected-group keys in :attr:`OPTIONS`.
    """

    projector = QuantizedSVDProjector()
    inner = QuantizedAdamMoments()
    update_rule = DropResidual()
    HYPERPARAMETERS = ADAM_8BIT
    OPTIONS = {
        **SUBSPACE,
        **REFRESH,
        "quant": Option(True, bool, help="store the projector as min-max codes (False: float, as GaLore)"),
        "quant_n_bit": Option(4, int, choices=(4, 8), help="bits of the projector codes"),
        "quant_group_size": Option(256, int, low=1, help="numbers per min-max group of the projector codes"),
        "cos_threshold": Option(
            0.4, float, low=0, high=1, help="mean |cos| of successive first singular vectors above which the gap grows"
        ),
        "gamma_proj": Option(2.0, float, low=1, help="factor by which a settled layer's refresh gap grows"),
        "queue_size": Option(5, int, low=1, help="refreshes whose cosines are averaged"),
        "weight_quant": Option(False, bool, help="keep the projected weights as INT8 codes (simulation mode)"),
        "weight_group_size": Option(256, int, low=1, help="numbers per min-max group of the INT8 weights"),
        "stochastic_round": Option(True, bool, help="round the INT8 weights stochastically (unbiased)"),
    }

    def refresh_gap(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> int:
        """Steps to the next multiple of the parameter's own (grown) gap, the reference's schedule."""
        gap, step = state["proj_gap"], state["step"]
        return (step // gap + 1) * gap - step

    def after_update(self, param: torch.Tensor, weight: torch.Tensor, state: dict, group: Mapping[str, Any]) -> None:
        """With ``weight_quant``: quantise ``weight`` (``param``'s values, or its gathered full
        matrix under FSDP2, so the INT8 groups are those of the whole matrix) to INT8 codes in
        ``state`` and overwrite it with their dequantised values; ``param`` keys the seed."""
        if not group["weight_quant"]:
            return
        generator = None
        if group["stochastic_round"]:
            seed = self.parameter_seed(param, group) * 1_000_003 + state["step"]
            generator = torch.Generator(device=weight.device).manual_seed(seed)
        size = group["weight_group_size"]
        codes, low, step = minmax_quantize(weight, bits=8, group_size=size, generator=generator)
        state.update({"weight_codes": codes, "weight_min": low, "weight_step": step})
        weight.copy_(
            minmax_dequantize(codes, low, step, bits=8, group_size=size, shape=weight.shape, dtype=weight.dtype)
        )


def int8_weight(optimizer: QGaLoreAdamW8bit, param: torch.Tensor) -> torch.Tensor:
    """The dequantised INT8 weight of ``param`` held by ``optimizer`` (equals ``param``'s values)."""
    state = optimizer.state[param]
    if "weight_codes" not in state:
        raise RankwiseError("this parameter has no INT8 weight yet: pass weight_quant=True and take a step first")
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return minmax_dequantize(
        state["weight_codes"],
        state["weight_min"],
        state["weight_step"],
        bits=8,
        group_size=group["weight_group_size"],
        shape=param.shape,
        dtype=param.dtype,
    )
