"""Interoperability with Hugging Face PEFT's LoRA adapter format (export and import).

On disk a PEFT LoRA adapter is ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors`` with one pair of tensors per adapted ``nn.Linear``::

    base_model.model.<module path>.lora_A.weight     r x in
    base_model.model.<module path>.lora_B.weight     out x r

and PEFT computes ``W0 x + s B A x`` on the ORIGINAL weight ``W0``, with ``s = alpha / r``
(``alpha / sqrt(r)`` under ``use_rslora``); ``r`` / ``alpha`` come from ``rank_pattern`` /
``alpha_pattern`` when a key matches the module path, else from ``r`` / ``lora_alpha``.

Export (:func:`export_peft`). The rankwise model computes ``W_eff = W0 + D`` with, per layer,
``D = delta_weight() - base_offset()`` (the second term only for methods that rewrite the
base; ``D`` does not depend on whether the model is merged). Each module is written as

- plain ``lora`` layers: their own ``lora_A`` / ``lora_B``, rank and scaling (``lora_alpha``
  chosen so PEFT's ``s`` equals the layer's), so training can continue in PEFT unchanged;
- other exactly factored layers (``lora_factors() = (B, A)``, scaling folded in, and for
  base-rewriting ones ``base_offset_factors() = (B0, A0)``): ``D = B A - B0 A0 = [B, -B0] [A; A0]``,
  so ``lora_B = [B, -B0]``, ``lora_A = [A; A0]``, rank ``k + k0``, ``lora_alpha = rank``
  (``s = 1``: the scaling is already in ``B``). Exact up to rounding;
- anything else: the best rank-``k`` approximation of ``D`` in Frobenius norm (Eckart-Young),
  the truncated SVD ``D_k = U_k S_k V_k^T`` split as ``lora_B = U_k S_k^{1/2}``,
  ``lora_A = S_k^{1/2} V_k^T``, ``lora_alpha = k``; ``k`` defaults to the layer's rank.

The report gives per module the rank, ``exact`` (factored, or ``k`` at least the numerical
rank of ``D``) and ``relative_error = ||D - s B' A'||_F / ||D||_F`` measured on the tensors as
written (in the weight's dtype). ``require_exact=True`` refuses before writing anything.

Import (:func:`import_peft`) validates the directory, the config (LoRA only; no DoRA, biases,
``modules_to_save``, ... ; no init that rewrites the base, whose saved factors are relative to
a residual weight PEFT recomputes on load), the tensor keys, module paths and shapes, all
before the model is touched; then it wraps each module with a rankwise ``lora`` layer with
PEFT's per-module ``r`` / ``alpha`` / ``use_rslora`` and the saved factors. Only JSON and
safetensors are read (``adapter_model.bin`` is pickle and refused).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rankwise.adapters.api import build_layer, install_layers, refuse_adapted, require_adapters
from rankwise.adapters.base import AdapterLayer
from rankwise.adapters.lora import LoraLayer
from rankwise.errors import RankwiseError
from rankwise.files import read_json_object
from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import svd

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
FACTOR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}

# PEFT task type from the model class: *ForCausalLM -> CAUSAL_LM; encoder-decoder
# *ForConditionalGeneration / *ForSeq2SeqLM -> SEQ_2_SEQ_LM; a bare *Model -> FEATURE_EXTRACTION.
# Classification / QA heads are left at None on purpose: for those task types PEFT copies the
# head into modules_to_save and refuses LoRA on it, so the loaded model would not be the
# exported one; task_type None loads exactly what is written.
SEQ2SEQ_SUFFIXES = ("ForConditionalGeneration", "ForSeq2SeqLM")

# init_lora_weights values that leave the base weight alone; the others (pissa*, olora,
# corda*, loftq, lora_ga, mica) make PEFT rewrite the base on load.
BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal")

# Config fields of features a rankwise lora layer cannot represent: value that means "off".
UNSUPPORTED_FEATURES = {
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "arrow_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "kasa_config": None,
}


# ----- export ---------------------------------------------------------------------------------


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


def _pattern_key(name: str) -> str:
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module path). The escaped path
    # anchored with "^" matches that module only, never a longer path ending in ".<name>".
    return "^" + re.escape(name)


def _plain_number(value: float) -> int | float:
    """``16.0 -> 16`` so the JSON reads like a hand-written LoraConfig."""
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def export_peft(
    model: nn.Module, directory: str | Path, *, rank: int | None = None, require_exact: bool = False
) -> dict[str, Any]:
    """Write the adapters of ``model`` as a PEFT LoRA adapter against the ORIGINAL base weights.

    ``peft.PeftModel.from_pretrained(original_base, directory)`` then computes what ``model``
    computes (exactly for factored updates). ``rank``: the rank of the truncated-SVD export
    of updates that are not exactly factored (default: each layer's own rank); factored
    updates keep their own rank. ``require_exact=True`` raises (writing nothing) when some
    update would only be approximated. ``model`` is not modified (merged or not).

    Returns ``{"path", "exact", "max_relative_error", "modules": {name: {"rank", "alpha",
    "exact", "relative_error", "source"}}}`` with ``source`` one of ``"lora"``, ``"factors"``, ``"svd"``.
    """
    layers = require_adapters(model, "export a PEFT adapter")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise RankwiseError(f"rank must be a positive integer (or None for each layer's own rank), got {rank!r}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise RankwiseError(f"{path} exists and is not a directory; choose another path")

    entries: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        dtype = layer.base.weight.dtype
        # The reference update is the fp32 product of exact factors when there are any, so the
        # reported error of an exact export is only the cost of writing it in the weight's dtype.
        if type(layer) is LoraLayer:
            up, down = layer.lora_B.detach(), layer.lora_A.detach()
            update = layer.scaling * (up.float() @ down.float())
            entry = {"source": "lora", "scaling": layer.scaling, "exact": True, "rslora": layer.options["rslora"],
                     "alpha": layer.alpha}
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
    # otherwise each module's alpha is set so that alpha / r equals its scaling.
    use_rslora = all(e["source"] == "lora" and e["rslora"] for e in entries.values())
    for entry in entries.values():
        native = entry["source"] == "lora" and entry["rslora"] == use_rslora
        denominator = math.sqrt(entry["rank"]) if use_rslora else entry["rank"]
        entry["peft_alpha"] = _plain_number(entry["alpha"] if native else entry["scaling"] * denominator)

    default_rank = _most_common([e["rank"] for e in entries.values()])
    default_alpha = _most_common([e["peft_alpha"] for e in entries.values()])
    rank_pattern = {_pattern_key(n): e["rank"] for n, e in sorted(entries.items()) if e["rank"] != default_rank}
    alpha_pattern = {
        _pattern_key(n): e["peft_alpha"] for n, e in sorted(entries.items()) if e["peft_alpha"] != default_alpha
    }
    dropouts = {e["dropout"] for e in entries.values()}
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": _guess_task_type(model),
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": default_rank,
        "lora_alpha": default_alpha,
        "target_modules": sorted(entries),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": use_rslora,
        "lora_dropout": dropouts.pop() if len(dropouts) == 1 else 0.0,
        "fan_in_fan_out": False,
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
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = entry["down"].to("cpu").clone()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = entry["up"].to("cpu").clone()
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


# ----- import ---------------------------------------------------------------------------------


def _read_peft_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, CONFIG_FILE, what="PEFT adapter directory",
                            fix="pass the directory PEFT's save_pretrained wrote")


def _check_number(value: Any, what: str, config_path: Path, *, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "a positive integer" if integer else "a positive number"
        raise RankwiseError(f"{config_path}: {what} must be {kind}, got {value!r}")


def _check_peft_config(config: dict[str, Any], config_path: Path) -> None:
    """Everything rankwise's lora layer cannot reproduce raises here, naming the field."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise RankwiseError(
            f"{config_path} has peft_type {peft_type!r}; import_peft reads LoRA adapters only (peft_type 'LORA')"
        )
    _check_number(config.get("r", 8), "r", config_path, integer=True)
    _check_number(config.get("lora_alpha", 8), "lora_alpha", config_path, integer=False)
    for field in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(field, False), bool):
            raise RankwiseError(f"{config_path}: {field} must be true or false, got {config[field]!r}")
    if config.get("fan_in_fan_out", False):
        raise RankwiseError(
            f"{config_path} sets fan_in_fan_out (weights stored in x out, GPT-2 Conv1D); rankwise adapts nn.Linear "
            "only -- convert the model to nn.Linear layers and re-save the adapter"
        )
    if config.get("bias", "none") != "none":
        raise RankwiseError(
            f"{config_path} sets bias={config['bias']!r}: the adapter also trains biases, which a LoRA layer cannot "
            "hold; re-train with bias='none'"
        )
    for field, off in UNSUPPORTED_FEATURES.items():
        if config.get(field, off) not in (off, False, None, [], {}):
            raise RankwiseError(
                f"{config_path} uses {field}={config[field]!r}, which rankwise's LoRA import does not support; "
                "only plain LoRA / rsLoRA adapters (optionally with rank_pattern / alpha_pattern) can be imported"
            )
    init = config.get("init_lora_weights", True)
    if not any(init is allowed or (isinstance(init, str) and init == allowed) for allowed in BASE_PRESERVING_INITS):
        raise RankwiseError(
            f"{config_path} has init_lora_weights={init!r}: PEFT rewrites the base weight on load for this init, so "
            "the saved factors are not relative to the original weight; re-save it with PEFT's "
            "path_initial_model_for_weight_conversion to convert it into a plain LoRA"
        )
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise RankwiseError(f"{config_path}: {field} must be an object {{module pattern: value}}, got {pattern!r}")
        for key, value in pattern.items():
            _check_number(value, f"{field}[{key!r}]", config_path, integer=integer)
            try:
                re.compile(key)
            except re.error as exc:
                raise RankwiseError(f"{config_path}: {field} key {key!r} is not a valid regex ({exc})") from None


def _read_peft_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        if (path / PICKLE_WEIGHTS_FILE).is_file():
            raise RankwiseError(
                f"{path} holds {PICKLE_WEIGHTS_FILE}, a pickle file rankwise never loads (it can run code); "
                "re-save the adapter with PEFT's save_pretrained(..., safe_serialization=True) to get "
                f"{WEIGHTS_FILE}"
            )
        raise RankwiseError(f"{weights_path} is missing; re-save the adapter with PEFT's save_pretrained")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for truncated / corrupt files
        raise RankwiseError(f"{weights_path} is not a readable safetensors file ({exc}); re-save the adapter") from None


def _factor_pairs(tensors: dict[str, torch.Tensor], weights_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"A": lora_A, "B": lora_B}}`` from PEFT's key names; other keys raise."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(KEY_PREFIX):
            unexpected.append(key)
            continue
        pairs.setdefault(key[len(KEY_PREFIX) : -len(suffix)], {})[FACTOR_SUFFIXES[suffix]] = tensor
    if unexpected:
        raise RankwiseError(
            f"{weights_path} has tensors that are not LoRA factors of Linear layers: {unexpected[:5]}; "
            f"import_peft reads only '{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' "
            "(no embedding LoRA, DoRA magnitudes, biases or modules_to_save)"
        )
    if not pairs:
        raise RankwiseError(f"{weights_path} holds no LoRA tensors; re-save the adapter")
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            (present,) = pair
            missing = "B" if present == "A" else "A"
            raise RankwiseError(f"{weights_path} has lora_{present} but no lora_{missing} for {name!r}; the file is "
                                "incomplete -- re-save the adapter")
    return pairs


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key matching a dot-delimited suffix of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _targeted_by_config(targets: Any, name: str) -> bool:
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def import_peft(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """Load the PEFT LoRA adapter saved in ``directory`` onto ``base_model`` (in place) and return it.

    Each adapted module becomes a rankwise ``lora`` layer with PEFT's per-module ``r`` and
    ``alpha`` (``rank_pattern`` / ``alpha_pattern``) and ``use_rslora``, so the model computes
    what ``peft.PeftModel.from_pretrained(base_model, directory)`` computes. Every check runs
    before ``base_model`` is modified.
    """
    path = Path(directory)
    config_path = path / CONFIG_FILE
    config = _read_peft_config(path)
    _check_peft_config(config, config_path)
    pairs = _factor_pairs(_read_peft_tensors(path), path / WEIGHTS_FILE)
    refuse_adapted(base_model, "import a PEFT adapter")

    targets = config.get("target_modules")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_rslora = config.get("use_rslora", False)
    dropout = config.get("lora_dropout", 0.0)
    plan = {}
    for name, pair in sorted(pairs.items()):
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            raise RankwiseError(
                f"the adapter has weights for {name!r} but the base model has no such module; load it onto the "
                f"model named in base_model_name_or_path ({config.get('base_model_name_or_path')!r})"
            ) from None
        if not isinstance(module, nn.Linear):
            raise RankwiseError(f"module {name!r} of the base model is a {type(module).__name__}; import_peft "
                                "supports LoRA on nn.Linear only")
        if not _targeted_by_config(targets, name):
            raise RankwiseError(f"{config_path}: target_modules {targets!r} does not cover {name!r}, which has "
                                "weights; the config and the weights disagree -- re-save the adapter")
        rank = _pattern_value(rank_pattern, name, config.get("r", 8))
        alpha = _pattern_value(alpha_pattern, name, config.get("lora_alpha", 8))
        expected = {"A": (rank, module.in_features), "B": (module.out_features, rank)}
        for factor, shape in expected.items():
            if tuple(pair[factor].shape) != shape:
                raise RankwiseError(
                    f"lora_{factor} of {name!r} has shape {tuple(pair[factor].shape)}, expected {shape} "
                    f"(r={rank} from the config, layer {module.out_features} x {module.in_features}); the adapter "
                    "belongs to another base model or its rank_pattern is wrong"
                )
        plan[name] = (module, rank, alpha, pair)

    layers = {
        name: build_layer("lora", module, rank, alpha, name, {"rslora": use_rslora, "dropout": dropout})
        for name, (module, rank, alpha, _) in plan.items()
    }
    # Nothing in base_model has changed so far; from here on only validated tensors are written.
    with torch.no_grad():
        for name, layer in layers.items():
            pair = plan[name][3]
            layer.lora_A.copy_(pair["A"].to(**layer.factory))
            layer.lora_B.copy_(pair["B"].to(**layer.factory))
    install_layers(base_model, layers)
    return base_model
