"""Writing rankwise adapters in Hugging Face PEFT's LoRA format (:func:`export_peft`).

The rankwise model computes ``W_eff = W0 + D`` with, per layer, ``D = delta_weight() -
base_offset()`` (the second term only for methods that rewrite the base; ``D`` does not depend
on whether the model is merged). Each module is written (format: :mod:`~rankwise.adapters.peft_format`) as

- LoRA-shaped layers that leave the base alone (``lora_parameters()`` is not None: lora,
  rsLoRA, EVA, LoRA-Pro, LoRA-GGPO): their own ``lora_A`` / ``lora_B``, rank and scaling
  (``lora_alpha`` chosen so PEFT's ``s`` equals the layer's), so training can continue in
  PEFT unchanged;
- other exactly factored layers (``lora_factors() = (B, A)``, scaling folded in, and for
  base-rewriting ones ``base_offset_factors() = (B0, A0)``): ``D = B A - B0 A0 = [B, -B0] [A; A0]``,
  so ``lora_B = [B, -B0]``, ``lora_A = [A; A0]``, rank ``k + k0``, ``lora_alpha = rank``
  (``s = 1``: the scaling is already in ``B``). Exact up to rounding;
- anything else: the best rank-``k`` approximation of ``D`` in Frobenius norm (Eckart-Young),
  the truncated SVD ``D_k = U_k S_k V_k^T`` split as ``lora_B = U_k S_k^{1/2}``,
  ``lora_A = S_k^{1/2} V_k^T``, ``lora_alpha = k``; ``k`` defaults to the layer's rank.

Methods PEFT has in its own format (DoRA, VeRA, RandLoRA, Uni-LoRA, LoHa, LoKr, MiSS, ...)
say so through ``AdapterLayer.peft_native()``; when every layer of the export has such a
form, of one ``peft_type`` and config, that format is written instead, exactly.

The report gives per module the rank, ``exact`` (factored, or ``k`` at least the numerical
rank of ``D``) and ``relative_error = ||D - s B' A'||_F / ||D||_F`` measured on the tensors as
written (in the weight's dtype). ``require_exact=True`` refuses before writing anything.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rankwise.adapters.api import require_adapters
from rankwise.adapters.base import AdapterLayer, PeftNative
from rankwise.adapters.peft_format import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, factor_key, pattern_key, peft_layout
from rankwise.errors import RankwiseError
from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import svd
from rankwise.options import Option

# PEFT task type from the model class: *ForCausalLM -> CAUSAL_LM; encoder-decoder
# *ForConditionalGeneration / *ForSeq2SeqLM -> SEQ_2_SEQ_LM; a bare *Model -> FEATURE_EXTRACTION.
# Classification / QA heads are left at None on purpose: for those task types PEFT copies the
# head into modules_to_save and refuses LoRA on it, so the loaded model would not be the
# exported one; task_type None loads exactly what is written.
SEQ2SEQ_SUFFIXES = ("ForConditionalGeneration", "ForSeq2SeqLM")

EXPORT_RANK = Option(
    None, int, low=1, nullable=True,
    help="rank of the truncated-SVD export of updates that are not exactly factored; None = each layer's rank",
)


def _module_update(layer: AdapterLayer) -> torch.Tensor:
    """``D = W_eff - W0`` in fp32: ``delta_weight() - base_offset()`` (merge-state independent)."""
    with torch.no_grad():
        update = layer.delta_weight().float()
        if layer.rewrites_base:
            update = update - layer.base_offset().float()
    return update


def _exact_factors(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B', A')`` with ``B' A' = D`` (scaling 1) when the layer's factors give it exactly."""
    factors = layer.lora_factors()
    if factors is None:
        return None
    up, down = factors
    if layer.rewrites_base:
        offset = layer.base_offset_factors()
        if offset is None:
            return None
        up0, down0 = offset
        up, down = torch.cat([up, -up0.to(up)], dim=1), torch.cat([down, down0.to(down)], dim=0)
    return up.float(), down.float()


def _svd_factors(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Best rank-``rank`` factors of ``update`` and whether they reproduce it (numerical rank <= rank)."""
    u, s, vh = svd(update)
    # The numerical rank's usual threshold (numpy / torch.linalg.matrix_rank): s_max * max(m, n) * eps.
    tolerance = (s[0] if s.numel() else 0.0) * max(update.shape) * torch.finfo(torch.float32).eps
    exact = int((s > tolerance).sum()) <= rank
    up, down = split_singular_values(u[:, :rank], s[:rank], vh[:rank])
    return up, down, exact


def _relative_error(update: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scaling: float) -> float:
    norm = torch.linalg.matrix_norm(update).item()
    residual = torch.linalg.matrix_norm(update - scaling * (up.float() @ down.float())).item()
    return residual / norm if norm > 0 else residual


def _guess_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith(SEQ2SEQ_SUFFIXES) and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return "FEATURE_EXTRACTION" if name.endswith("Model") else None


def _plain_number(value: float) -> int | float:
    """``16.0 -> 16`` (and ``4.999999999999999 -> 5``) so the JSON reads like a hand-written LoraConfig."""
    value = float(f"{value:.12g}")  # alpha = s * r recomputed from s: drop the last-bit rounding
    return int(value) if value.is_integer() else value


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _config_header(model: nn.Module, peft_type: str) -> dict[str, Any]:
    """The fields every PEFT config starts with."""
    return {
        "peft_type": peft_type,
        "task_type": _guess_task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
    }


def _one_native_format(natives: Any) -> bool:
    """Whether the layers' native forms fit one PEFT adapter: one peft_type and one config."""
    natives = list(natives)
    return all(n.peft_type == natives[0].peft_type and n.config == natives[0].config for n in natives)


def _export_native(model: nn.Module, path: Path, natives: dict[str, PeftNative]) -> dict[str, Any]:
    """Write every layer in its method's own PEFT format (``AdapterLayer.peft_native``): exact."""
    first = next(iter(natives.values()))
    tensors: dict[str, torch.Tensor] = {}
    for name, native in natives.items():
        for suffix, tensor in native.tensors.items():
            tensors[f"{KEY_PREFIX}{name}.{suffix}"] = tensor.detach().to("cpu").contiguous().clone()
        for key, tensor in native.shared.items():
            if key not in tensors:  # one copy of what all layers share (VeRA's random matrices)
                tensors[key] = tensor.detach().to("cpu").contiguous().clone()
    config = {**_config_header(model, first.peft_type), "target_modules": sorted(natives), **first.config}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    modules = {name: {"rank": None, "alpha": None, "exact": True, "relative_error": 0.0, "source": "native"}
               for name in natives}
    return {"path": str(path), "exact": True, "max_relative_error": 0.0, "modules": modules,
            "peft_type": first.peft_type}


def export_peft(
    model: nn.Module,
    directory: str | Path,
    *,
    rank: int | None = None,
    require_exact: bool = False,
    adapter_name: str | None = None,
) -> dict[str, Any]:
    """Write the adapters of ``model`` as a PEFT LoRA adapter against the ORIGINAL base weights.

    ``peft.PeftModel.from_pretrained(original_base, directory)`` then computes what ``model``
    computes (exactly for factored updates). ``rank``: the rank of the truncated-SVD export
    of updates that are not exactly factored (default: each layer's own rank); factored
    updates keep their own rank. ``require_exact=True`` raises (writing nothing) when some
    update would only be approximated. ``model`` is not modified (merged or not). ``adapter_name``:
    which adapter (default the active one). GPT-2 ``Conv1D`` layers set ``fan_in_fan_out``;
    embeddings are written as ``lora_embedding_A`` / ``_B`` and Conv2d factors as PEFT's kernels.

    Returns ``{"path", "exact", "max_relative_error", "modules": {name: {"rank", "alpha",
    "exact", "relative_error", "source"}}}`` with ``source`` one of ``"lora"``, ``"factors"``, ``"svd"``.
    When every layer has a native PEFT form of one type (``AdapterLayer.peft_native``: DoRA,
    VeRA, LoHa, ...), that is written instead (``source`` ``"native"``, ``"peft_type"`` in the report).
    """
    layers = require_adapters(model, "export a PEFT adapter", adapter_name)
    EXPORT_RANK.check("rank", rank, "export_peft")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise RankwiseError(f"{path} exists and is not a directory; choose another path")
    natives = {name: layer.peft_native() for name, layer in layers.items()}
    if all(natives.values()) and _one_native_format(natives.values()):
        return _export_native(model, path, natives)

    entries: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        dtype = layer.factory["dtype"]
        # The reference update is the fp32 product of exact factors when there are any, so the
        # reported error of an exact export is only the cost of writing it in the weight's dtype.
        native = None if layer.rewrites_base else layer.lora_parameters()
        if native is not None:
            up, down = native.B.detach(), native.A.detach()
            update = native.scaling * (up.float() @ down.float())
            entry = {"source": "lora", "scaling": native.scaling, "exact": True, "rslora": native.rslora}
        elif (factors := _exact_factors(layer)) is not None:
            up, down = factors
            update = up @ down
            entry = {"source": "factors", "scaling": 1.0, "exact": True}
        else:
            update = _module_update(layer)
            target = min(rank or layer.rank, *update.shape)
            up, down, exact = _svd_factors(update, target)
            entry = {"source": "svd", "scaling": 1.0, "exact": exact}
        if down.shape[0] == 0:
            continue  # every rank pruned (SoRA gates, AdaLoRA budget): the update is exactly zero
        up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
        entry.update(up=up, down=down, rank=down.shape[0], dropout=float(layer.options["dropout"]),
                     relative_error=_relative_error(update, up, down, entry["scaling"]))
        entries[name] = entry

    if not entries:
        raise RankwiseError("nothing to export: every adapter layer's rank was pruned to 0, so the update is zero")
    inexact = [name for name, entry in entries.items() if not entry["exact"]]
    if require_exact and inexact:
        sample = ", ".join(f"{n} ({layers[n].method}, error {entries[n]['relative_error']:.3g})" for n in inexact[:5])
        raise RankwiseError(
            f"require_exact=True but {len(inexact)} update(s) are not low-rank-factored and a rank-k LoRA only "
            f"approximates them: {sample}; pass a larger rank= (up to min(out, in) is exact) or "
            "require_exact=False to accept the reported error"
        )

    # PEFT's use_rslora is global: keep it only when every module is a native rsLoRA layer;
    # each module's alpha is then set so that PEFT's alpha / r (or alpha / sqrt r) is its scaling.
    use_rslora = all(e["source"] == "lora" and e["rslora"] for e in entries.values())
    for entry in entries.values():
        denominator = math.sqrt(entry["rank"]) if use_rslora else entry["rank"]
        entry["peft_alpha"] = _plain_number(entry["scaling"] * denominator)

    default_rank = _most_common([e["rank"] for e in entries.values()])
    default_alpha = _most_common([e["peft_alpha"] for e in entries.values()])
    rank_pattern = {pattern_key(n): e["rank"] for n, e in sorted(entries.items()) if e["rank"] != default_rank}
    alpha_pattern = {
        pattern_key(n): e["peft_alpha"] for n, e in sorted(entries.items()) if e["peft_alpha"] != default_alpha
    }
    dropouts = {e["dropout"] for e in entries.values()}
    config = {
        **_config_header(model, "LORA"),
        "r": default_rank,
        "lora_alpha": default_alpha,
        "target_modules": sorted(entries),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "lora_dropout": dropouts.pop() if len(dropouts) == 1 else 0.0,
        "fan_in_fan_out": any(layers[name].kind == "conv1d" for name in entries),
        "bias": "none",
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
        "layer_replication": None,
        "auto_mapping": None,
    }
    tensors = {}
    for name, entry in entries.items():
        layer = layers[name]
        for factor, tensor in (("A", entry["down"]), ("B", entry["up"])):
            stored = peft_layout(tensor, factor, layer.base).to("cpu").contiguous().clone()
            tensors[factor_key(name, factor, layer.kind)] = stored
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    modules = {
        name: {"rank": entry["rank"], "alpha": entry["peft_alpha"], "exact": entry["exact"],
               "relative_error": entry["relative_error"], "source": entry["source"]}
        for name, entry in entries.items()
    }
    return {
        "path": str(path),
        "exact": not inexact,
        "max_relative_error": max(m["relative_error"] for m in modules.values()),
        "modules": modules,
    }
