"""Q-GaLore: INT4 projectors, lazy layer-wise subspace refresh, 8-bit Adam, optional INT8
weights (``qgalore``, :class:`QGaLoreAdamW8bit`).

Paper: Zhang, Jaiswal, Yin, Liu, Zhao, Tian, Wang, "Q-GaLore: Quantized GaLore with INT4
Projection and Layer-Adaptive Low-Rank Gradients", arXiv 2407.08296.

On top of GaLore (:mod:`rankwise.optim.galore`) with 8-bit Adam moments
(:mod:`rankwise.optim.galore8bit`), for a weight ``W`` with gradient ``G_t``:

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
  ``gamma_proj`` (2): ``T <- int(T * gamma_proj)``. Layers whose subspace has settled are
  re-decomposed exponentially less often.
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
- 8-bit moments, eps placement and weight decay as in :mod:`rankwise.optim.galore8bit`;
  all state is tensors / plain values, so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from rankwise.errors import RankwiseError
from rankwise.linalg.projections import Basis, projection_sides, singular_basis
from rankwise.linalg.quant import minmax_dequantize, minmax_quantize
from rankwise.optim.core import OPTIMIZERS, Projector, _is_positive_int, _is_real
from rankwise.optim.distributed import is_dtensor
from rankwise.optim.galore8bit import GaLoreAdamW8bit

_SIDES = ("proj_left", "proj_right")


class QuantizedSVDProjector(Projector):
    """GaLore's SVD projector whose basis is stored with ``quant_n_bit`` min-max codes
    (``proj_*_codes`` / ``proj_*_min`` / ``proj_*_step``; float ``proj_*`` when ``quant`` is
    off), and which records ``|cos|`` between successive first singular vectors
    (``proj_cos_window``, ``proj_cos_count``) and grows ``proj_gap`` (see module docstring)."""

    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        use_left, use_right = projection_sides(grad.shape, group["proj_type"])
        new = singular_basis(grad, group["rank"], use_left=use_left, use_right=use_right)
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


class QGaLoreAdamW8bit(GaLoreAdamW8bit):
    """Drop-in for ``q_galore_torch.QGaLoreAdamW8bit``: a group is projected iff it has ``rank``.

    ``QGaLoreAdamW8bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    min_8bit_size=4096)``; projected-group keys in :attr:`method_defaults`.
    """

    projector = QuantizedSVDProjector()
    method_defaults = {
        **GaLoreAdamW8bit.method_defaults,
        "quant": True,
        "quant_n_bit": 4,
        "quant_group_size": 256,
        "cos_threshold": 0.4,
        "gamma_proj": 2,
        "queue_size": 5,
        "weight_quant": False,
        "weight_group_size": 256,
        "stochastic_round": True,
    }

    def validate_projected_group(self, group: Mapping[str, Any], params: Sequence[torch.Tensor]) -> None:
        super().validate_projected_group(group, params)
        for key in ("quant", "weight_quant", "stochastic_round"):
            if not isinstance(group[key], bool):
                raise RankwiseError(f"{key} must be True or False, got {group[key]!r}")
        if group["quant_n_bit"] not in (4, 8) or isinstance(group["quant_n_bit"], bool):
            bits = group["quant_n_bit"]
            raise RankwiseError(f"quant_n_bit must be 4 or 8 (bits of the projector codes), got {bits!r}")
        for key in ("quant_group_size", "weight_group_size", "queue_size"):
            if not _is_positive_int(group[key]):
                raise RankwiseError(f"{key} must be an integer >= 1, got {group[key]!r}")
        if not _is_real(group["cos_threshold"]) or not 0 <= group["cos_threshold"] <= 1:
            raise RankwiseError(f"cos_threshold must be a number in [0, 1], got {group['cos_threshold']!r}")
        if not _is_real(group["gamma_proj"]) or group["gamma_proj"] < 1:
            raise RankwiseError(
                f"gamma_proj must be a number >= 1 (factor by which a settled layer's gap grows), "
                f"got {group['gamma_proj']!r}"
            )

    def refresh_gap(self, state: Mapping[str, Any], group: Mapping[str, Any]) -> int:
        """The parameter's own gap, grown by the lazy-refresh rule."""
        return state["proj_gap"]

    @torch.no_grad()
    def step_parameter(
        self,
        param: torch.Tensor,
        group: Mapping[str, Any],
        *,
        weight: torch.Tensor | None = None,
        grad: torch.Tensor | None = None,
    ) -> None:
        """GaLore 8-bit step, then (``weight_quant``) requantise the updated weight to INT8.

        ``weight`` / ``grad`` as in :meth:`LowRankAdamW.step_parameter`: under FSDP2 they are
        the gathered full weight and gradient, so the INT8 groups (and their min / step) are
        those of the whole matrix, exactly as in single-process training, and the requantised
        values reach the shard through the caller's write-back.
        """
        if weight is None and is_dtensor(param):
            super().step_parameter(param, group)  # gathers the shard and calls back here
            return
        weight = param if weight is None else weight
        state = self.state[param]
        steps_before = state.get("step", 0)
        super().step_parameter(param, group, weight=weight, grad=grad)
        if group.get("weight_quant") and state.get("step", 0) > steps_before:
            self._store_int8_weight(param, weight, state, group)

    def _store_int8_weight(
        self, param: torch.Tensor, weight: torch.Tensor, state: dict, group: Mapping[str, Any]
    ) -> None:
        """Quantise ``weight`` (``param``'s values, or its gathered full matrix) to INT8 codes in
        ``state`` and overwrite it with their dequantised values; ``param`` keys the seed."""
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


OPTIMIZERS.register(
    "qgalore",
    family="galore",
    paper="Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank Gradients",
    arxiv="2407.08296",
)(QGaLoreAdamW8bit.from_parameters)
