"""Checking a Hugging Face PEFT LoRA adapter before :func:`~rankwise.adapters.peft_import.import_peft`
touches the model.

The config may only use what a rankwise ``lora`` layer reproduces (LoRA / rsLoRA, optionally
with ``rank_pattern`` / ``alpha_pattern``; no DoRA, biases, ``modules_to_save``, ...; no init
that rewrites the base, whose saved factors are relative to a residual weight PEFT recomputes
on load); the tensors must be ``lora_A`` / ``lora_B`` (``lora_embedding_A`` / ``_B``) pairs of
existing modules a rankwise ``lora`` layer takes (Linear, GPT-2 Conv1D -- ``fan_in_fan_out``
adapters --, bitsandbytes 4-bit / 8-bit Linear: a QLoRA adapter --, Embedding, Conv2d) with
the shapes the config gives. Only JSON and safetensors are read (``adapter_model.bin`` is
pickle and refused). Every failure is a RankwiseError naming the file, field or module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from rankwise.adapters.api import base_of
from rankwise.adapters.base import ADAPTERS, supported_kind_check
from rankwise.adapters.peft_format import (
    CONFIG_FILE,
    DEFAULT_ALPHA,
    DEFAULT_RANK,
    FACTOR_SUFFIXES,
    KEY_PREFIX,
    PICKLE_WEIGHTS_FILE,
    WEIGHTS_FILE,
    matrix_layout,
    pattern_value,
)
from rankwise.errors import RankwiseError
from rankwise.files import read_json_object
from rankwise.layers import features
from rankwise.options import Option

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

#: Scalar LoraConfig fields and what rankwise accepts (absent fields take these defaults).
CONFIG_FIELDS = {
    "r": Option(DEFAULT_RANK, int, low=1, help="LoRA rank"),
    "lora_alpha": Option(DEFAULT_ALPHA, float, low=0, low_open=True, help="LoRA alpha"),
    "use_rslora": Option(False, bool, help="rsLoRA scaling"),
    "fan_in_fan_out": Option(False, bool, help="weights stored in x out (GPT-2 Conv1D)"),
}


def read_peft_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of the PEFT adapter in ``path``, checked: everything rankwise's lora
    layer cannot reproduce raises here, naming the field."""
    rankwise_only = (path / "rankwise_adapter.json").is_file() and not (path / CONFIG_FILE).is_file()
    config = {} if rankwise_only else read_json_object(path, CONFIG_FILE, what="PEFT adapter directory",
                                                       fix="pass the directory PEFT's save_pretrained wrote")
    if rankwise_only or config.get("format") == "rankwise-adapter":
        raise RankwiseError(
            f"{path} holds an adapter in rankwise's own format (written by rankwise.save_adapter), not PEFT's; load "
            f"it with rankwise.load_adapter(base_model, {str(path)!r})"
        )
    _check_peft_config(config, path / CONFIG_FILE)
    return config


def _check_peft_config(config: dict[str, Any], config_path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise RankwiseError(
            f"{config_path} has peft_type {peft_type!r}; import_peft reads LoRA adapters only (peft_type 'LORA')"
        )
    for field, declared in CONFIG_FIELDS.items():
        declared.check(field, config.get(field, declared.default), str(config_path))
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
    for field, declared in (("rank_pattern", CONFIG_FIELDS["r"]), ("alpha_pattern", CONFIG_FIELDS["lora_alpha"])):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise RankwiseError(f"{config_path}: {field} must be an object {{module pattern: value}}, got {pattern!r}")
        for key, value in pattern.items():
            declared.check(f"{field}[{key!r}]", value, str(config_path))
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
            f"{weights_path} has tensors that are not LoRA factors: {unexpected[:5]}; import_peft reads only "
            f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' (or '.lora_embedding_A' / '_B') "
            "(no DoRA magnitudes, biases or modules_to_save)"
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


def _targeted_by_config(targets: Any, name: str) -> bool:
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass(frozen=True)
class ModulePlan:
    """One validated module of a PEFT adapter: where it goes, its ``r`` / ``alpha`` and factors."""

    module: nn.Module
    rank: int
    alpha: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor


def plan_import(base_model: nn.Module, path: Path, config: dict[str, Any]) -> dict[str, ModulePlan]:
    """Every adapted module of the PEFT adapter in ``path`` checked against ``base_model``: the
    tensors are LoRA pairs of existing modules a ``lora`` layer takes that ``target_modules`` covers, with
    the shapes the config's (per-module) ``r`` gives. Nothing is modified."""
    config_path = path / CONFIG_FILE
    pairs = _factor_pairs(_read_peft_tensors(path), path / WEIGHTS_FILE)
    targets = config.get("target_modules")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    plan = {}
    for name, pair in sorted(pairs.items()):
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            raise RankwiseError(
                f"the adapter has weights for {name!r} but the base model has no such module; load it onto the "
                f"model named in base_model_name_or_path ({config.get('base_model_name_or_path')!r})"
            ) from None
        module = base_of(module)
        supported_kind_check("lora", ADAPTERS.entry("lora").supports, name, module)
        if not _targeted_by_config(targets, name):
            raise RankwiseError(f"{config_path}: target_modules {targets!r} does not cover {name!r}, which has "
                                "weights; the config and the weights disagree -- re-save the adapter")
        rank = pattern_value(rank_pattern, name, config.get("r", DEFAULT_RANK))
        alpha = pattern_value(alpha_pattern, name, config.get("lora_alpha", DEFAULT_ALPHA))
        out_features, in_features = features(module)
        expected = {"A": (rank, in_features), "B": (out_features, rank)}
        factors = {factor: matrix_layout(pair[factor]) for factor in expected}
        for factor, shape in expected.items():
            if tuple(factors[factor].shape) != shape:
                raise RankwiseError(
                    f"lora_{factor} of {name!r} has shape {tuple(pair[factor].shape)}, expected {shape} "
                    f"(r={rank} from the config, layer {out_features} x {in_features}); the adapter "
                    "belongs to another base model or its rank_pattern is wrong"
                )
        plan[name] = ModulePlan(module, rank, alpha, factors["A"], factors["B"])
    return plan
