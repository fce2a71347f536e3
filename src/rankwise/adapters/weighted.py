"""One adapter from a weighted combination of LoRA adapters (PEFT's ``add_weighted_adapter``).

For adapters ``i`` with weights ``w_i``, LoRA factors ``A_i`` (r_i x in), ``B_i`` (out x r_i) and
scalings ``s_i`` (``delta_i = s_i B_i A_i``), on every module at least one of them adapts:

- ``"cat"``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, rank ``sum r_i``:
  ``B A = sum_i w_i delta_i`` exactly;
- ``"linear"``: ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i``, ``B = sum_i sqrt|w_i s_i| B_i`` (every
  ``r_i`` equal): the factors are combined, not the updates, so ``B A`` also holds the cross
  terms ``B_i A_j`` -- PEFT's definition (exact for one adapter: ``B A = w delta``);
- ``"svd"``: the best rank-``k`` approximation of ``D = sum_i w_i delta_i`` (Eckart-Young):
  ``D = U S V^T``, ``B = U_k S_k``, ``A = V_k^T``, ``k = svd_rank`` (default ``max r_i``);
  ``svd_clamp=q`` clamps the entries of ``B`` and ``A`` to the ``q``-quantile of their values
  (PEFT's option).

The result is a new ``lora`` adapter with scaling 1 (``alpha = rank``), as in PEFT; like every
call that adds an adapter it becomes the active one. Only adapters whose update is exactly a
trained LoRA pair (``lora_parameters()``: lora, rsLoRA, EVA, LoRA-Pro, LoRA-GGPO; not the base
rewrites) can be combined. With one adapter the combination is ``"linear"`` (PEFT's rule).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from rankwise.adapters.api import (
    adapted_modules,
    all_adapters,
    base_of,
    build_layer,
    install_layers,
    refuse_adapted,
    require_adapters,
)
from rankwise.adapters.base import AdapterLayer, check_adapter_name
from rankwise.errors import RankwiseError
from rankwise.linalg.svd import svd

COMBINATIONS = ("svd", "linear", "cat")


def _lora_factors(layer: AdapterLayer, adapter: str, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    native = None if layer.rewrites_base else layer.lora_parameters()
    if native is None:
        raise RankwiseError(
            f"adapter {adapter!r} ({layer.method}) on {module!r} is not a plain LoRA pair; add_weighted_adapter "
            "combines lora / rsLoRA / eva / lora_pro / lora_ggpo adapters only"
        )
    return native.A.detach().float(), native.B.detach().float(), native.scaling


def _combine(kind: str, parts: list[tuple[torch.Tensor, torch.Tensor, float, float]], svd_rank: int | None,
             svd_clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of the combination of ``(A_i, B_i, s_i, w_i)``."""
    if kind == "cat":
        return (torch.cat([w * s * a for a, _, s, w in parts], dim=0), torch.cat([b for _, b, _, _ in parts], dim=1))
    if kind == "linear":
        down = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * a for a, _, s, w in parts)
        up = sum(math.sqrt(abs(w * s)) * b for _, b, s, w in parts)
        return down, up
    update = sum(w * s * (b @ a) for a, b, s, w in parts)
    rank = min(svd_rank or max(a.shape[0] for a, _, _, _ in parts), *update.shape)
    u, singular, vh = svd(update)
    up, down = u[:, :rank] * singular[:rank], vh[:rank]
    if svd_clamp is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), svd_clamp)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    return down, up


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    *,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
) -> nn.Module:
    """Add adapter ``adapter_name``, the ``combination_type`` combination of ``adapters`` with ``weights``
    (see the module docstring), and make it the active adapter. Every check runs before the model changes."""
    check_adapter_name(adapter_name)
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise RankwiseError(f"pass one weight per adapter: got {len(adapters)} adapters and {len(weights)} weights")
    for name in adapters:
        require_adapters(model, "combine adapters", name)
    refuse_adapted(model, "add a weighted adapter", adapter_name)
    if combination_type not in COMBINATIONS:
        raise RankwiseError(f"combination_type {combination_type!r} is not one of {', '.join(COMBINATIONS)}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1):
        raise RankwiseError(f"svd_rank must be an integer >= 1 or None, got {svd_rank!r}")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise RankwiseError(f"svd_clamp must be a quantile in (0, 1] or None, got {svd_clamp!r}")
    kind = "linear" if len(adapters) == 1 else combination_type
    by_name = all_adapters(model)
    parts_of: dict[str, list[tuple[torch.Tensor, torch.Tensor, float, float]]] = {}
    layer_of: dict[str, AdapterLayer] = {}
    for adapter, weight in zip(adapters, weights):
        for module, layer in by_name[adapter].items():
            a, b, scaling = _lora_factors(layer, adapter, module)
            parts_of.setdefault(module, []).append((a, b, scaling, weight))
            layer_of.setdefault(module, layer)
    if kind == "linear":
        ranks = {a.shape[0] for parts in parts_of.values() for a, _, _, _ in parts}
        if len(ranks) > 1:
            raise RankwiseError(f"combination_type 'linear' needs adapters of one rank, got ranks {sorted(ranks)}; "
                                "use 'cat' or 'svd'")
    wrappers = adapted_modules(model)
    layers = {}
    for module, parts in parts_of.items():
        down, up = _combine(kind, parts, svd_rank, svd_clamp)
        template = layer_of[module]
        rank = down.shape[0]
        layer = build_layer("lora", base_of(wrappers[module]), rank, float(rank), module,
                            {"dropout": float(template.options["dropout"])}, adapter_name=adapter_name)
        with torch.no_grad():
            layer.lora_A.copy_(down.to(layer.lora_A))
            layer.lora_B.copy_(up.to(layer.lora_B))
        layers[module] = layer
    install_layers(model, layers, adapter_name)
    return model
