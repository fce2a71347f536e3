"""Saving adapters to a directory and loading them onto a fresh base model.

On disk (``dir``), rankwise's own files, which restore the exact method:

- ``rankwise_adapter.json``::

      {"format": "rankwise-adapter", "version": 1,
       "modules": {"<module name>": {"method": ..., "rank": ..., "alpha": ..., "options": {...},
                                      "base_shape": [out, in]}},
       "tied": {"<tensor key>": "<key it shares storage with>"}}

  ``modules`` is per layer (ranks may differ across layers) and doubles as the base-model
  fingerprint (module names + weight shapes, ``out x in`` as :mod:`rankwise.layers` sees them)
  checked before anything is loaded. ``adapter_name`` records the name it had (informative:
  ``load_adapter`` takes the name to load it under).
- ``rankwise_adapter.safetensors``: adapter tensors only, keyed ``<module name>.<tensor name>``
  (e.g. ``model.layers.0.self_attn.q_proj.lora_A``). A tensor shared by several layers is
  stored once; the others are listed in ``tied`` and re-tied on load.

and, when the adapter is exactly expressible in PEFT (``export_peft`` with
``require_exact=True`` succeeds: LoRA factors or the method's own PEFT format), PEFT's
``adapter_config.json`` / ``adapter_model.safetensors`` beside them, so
``peft.PeftModel.from_pretrained(base, dir)`` loads the same model. PEFT's file names are never
used for anything but PEFT's format (an older rankwise wrote its own format under them:
:func:`load_adapter` still reads such a directory).

:func:`load_adapter` validates the directory, JSON, safetensors, methods, module names,
shapes and tensor keys first and raises a RankwiseError with the base model untouched;
then it builds the layers through ``__init__`` only (no init, no data), copies the tensors
in, re-applies ``rewrites_base`` offsets to the fresh base weights and swaps the layers in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rankwise.adapters.api import (
    active_adapter,
    base_of,
    build_layer,
    existing_layers,
    install_layers,
    refuse_adapted,
    require_adapters,
    rewrite_bases,
)
from rankwise.adapters.base import ADAPTERS, RANK, AdapterLayer, check_adapter_name, supported_kind_check
from rankwise.adapters.peft_format import CONFIG_FILE as PEFT_CONFIG_FILE
from rankwise.adapters.peft_format import WEIGHTS_FILE as PEFT_WEIGHTS_FILE
from rankwise.errors import RankwiseError
from rankwise.files import read_json_object
from rankwise.layers import features, layer_kind

FORMAT = "rankwise-adapter"
VERSION = 1
CONFIG_FILE = "rankwise_adapter.json"
WEIGHTS_FILE = "rankwise_adapter.safetensors"
#: where rankwise < 0.2 wrote its own format (PEFT's names): still read by load_adapter
LEGACY_FILES = (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE)


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def save_adapter(model: nn.Module, directory: str | Path, adapter_name: str | None = None) -> None:
    """Write ``rankwise_adapter.json`` and ``rankwise_adapter.safetensors`` for adapter
    ``adapter_name`` of ``model`` (default: the active adapter -- with one adapter, the adapter),
    and PEFT's ``adapter_config.json`` / ``adapter_model.safetensors`` when that adapter is exactly
    expressible in PEFT (else PEFT files left from an earlier save are removed)."""
    layers = require_adapters(model, "save an adapter", adapter_name)
    modules = {}
    for name, layer in layers.items():
        modules[name] = {**layer.config(), "base_shape": [layer.out_features, layer.in_features]}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    for name, layer in layers.items():
        for key, tensor in layer.adapter_state().items():
            full_key = f"{name}.{key}"
            storage = _storage_key(tensor)
            if storage in first_key:
                tied[full_key] = first_key[storage]
                continue
            first_key[storage] = full_key
            # Cloning breaks any remaining storage overlap, which safetensors refuses.
            tensors[full_key] = tensor.detach().to("cpu").contiguous().clone()
    config = {"format": FORMAT, "version": VERSION, "modules": modules, "tied": tied,
              "adapter_name": adapter_name or active_adapter(model)}
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise RankwiseError(
            f"adapter options are not JSON-serialisable ({exc}); pass plain numbers, strings and bools"
        ) from None
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise RankwiseError(f"{path} exists and is not a directory; choose another path")
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": FORMAT, "version": str(VERSION)})
    (path / CONFIG_FILE).write_text(text + "\n")
    _save_peft_if_exact(model, path, adapter_name)


def _save_peft_if_exact(model: nn.Module, path: Path, adapter_name: str | None) -> None:
    from rankwise.adapters.peft_export import export_peft

    try:
        export_peft(model, path, require_exact=True, adapter_name=adapter_name)
    except RankwiseError:  # not a LoRA update PEFT can hold exactly: rankwise's files only
        for name in LEGACY_FILES:
            (path / name).unlink(missing_ok=True)


def _files(path: Path) -> tuple[str, str]:
    """``(config, weights)`` file names of rankwise's format in ``path``: its own, or the legacy
    ones; a PEFT-only directory raises, naming import_peft."""
    if (path / CONFIG_FILE).is_file() or not (path / PEFT_CONFIG_FILE).is_file():
        return CONFIG_FILE, WEIGHTS_FILE
    legacy = read_json_object(path, PEFT_CONFIG_FILE, what="adapter directory",
                              fix="pass a directory written by save_adapter")
    if legacy.get("format") != FORMAT:
        raise RankwiseError(
            f"{path} holds a PEFT adapter (adapter_config.json with peft_type {legacy.get('peft_type')!r}) and no "
            f"{CONFIG_FILE}; load it with rankwise.import_peft(base_model, {str(path)!r})"
        )
    return LEGACY_FILES


def _read_config(path: Path) -> dict[str, Any]:
    config_file, _ = _files(path)
    config = read_json_object(path, config_file, what="adapter directory", fix="pass a directory written by save_adapter")
    config_path = path / config_file
    if config.get("format") != FORMAT:
        raise RankwiseError(f"{config_path} is not a {FORMAT} config (format field missing or different)")
    if config.get("version") != VERSION:
        raise RankwiseError(
            f"{config_path} has format version {config.get('version')!r}; this rankwise reads {VERSION}"
        )
    modules, tied = config.get("modules"), config.get("tied", {})
    if not isinstance(modules, dict) or not modules or not isinstance(tied, dict):
        raise RankwiseError(f"{config_path} lists no adapted modules; re-save the adapter")
    for name, entry in modules.items():
        required = {"method", "rank", "alpha", "options", "base_shape"}
        if not isinstance(entry, dict) or not required <= set(entry) or not isinstance(entry["options"], dict):
            raise RankwiseError(f"{config_path}: entry for {name!r} needs the fields {sorted(required)}")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / _files(path)[1]
    if not weights_path.is_file():
        raise RankwiseError(f"{weights_path} is missing; re-save the adapter with rankwise.save_adapter")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for truncated / corrupt files
        raise RankwiseError(f"{weights_path} is not a readable safetensors file ({exc}); re-save the adapter") from None


def _check_base(base_model: nn.Module, modules: dict[str, Any]) -> dict[str, nn.Module]:
    bases = {}
    for name, entry in modules.items():
        if entry["method"] not in ADAPTERS:
            raise RankwiseError(f"adapter for {name!r} uses unknown method {entry['method']!r}; known: "
                                f"{', '.join(ADAPTERS.names())}")
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            raise RankwiseError(f"the base model has no module {name!r}; load the adapter onto the model it was "
                                "trained on") from None
        RANK.check("rank", entry["rank"], f"adapter for {name!r} (re-save it)")
        module = base_of(module)
        if layer_kind(module) is None:
            raise RankwiseError(f"module {name!r} of the base model is a {type(module).__name__}, which no adapter "
                                "wraps; load the adapter onto the model it was trained on")
        supported_kind_check(entry["method"], ADAPTERS.entry(entry["method"]).supports, name, module)
        shape = list(features(module))
        if list(entry["base_shape"]) != shape:
            raise RankwiseError(f"module {name!r} has weight shape {shape} but the adapter was trained on "
                                f"{entry['base_shape']}; load it onto the matching base model")
        bases[name] = module
    return bases


def _check_keys(layers: dict[str, AdapterLayer], tensors: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    expected = {
        f"{name}.{key}": value for name, layer in layers.items() for key, value in layer.adapter_state().items()
    }
    stored = set(tensors) | set(tied)
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or unexpected or any(target not in tensors for target in tied.values()):
        raise RankwiseError(
            f"adapter tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "the files are inconsistent -- re-save the adapter"
        )
    for key, value in expected.items():
        stored_shape = tuple(tensors[tied.get(key, key)].shape)
        if stored_shape != tuple(value.shape):
            raise RankwiseError(f"adapter tensor {key!r} has shape {stored_shape}, expected {tuple(value.shape)}")


def _copy_tensors(layers: dict[str, AdapterLayer], tensors: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    by_key = {}
    for name, layer in layers.items():
        for key, value in layer.adapter_state().items():
            by_key[f"{name}.{key}"] = (layer, key, value)
    with torch.no_grad():
        for full_key, (_, _, value) in by_key.items():
            if full_key not in tied:
                value.copy_(tensors[full_key].to(device=value.device, dtype=value.dtype))
        for full_key, canonical in tied.items():
            layer, key, _ = by_key[full_key]
            owner = layer.get_submodule(key.rpartition(".")[0]) if "." in key else layer
            attr = key.rpartition(".")[2]
            shared_tensor = by_key[canonical][2]
            if isinstance(shared_tensor, nn.Parameter):
                setattr(owner, attr, shared_tensor)
            else:
                owner._buffers[attr] = shared_tensor


def _shared_tensors(method: str, bases: dict[str, nn.Module], modules: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Re-create the method's shared tensors (values are then loaded): nominal rank = largest saved rank."""
    names = [name for name, entry in modules.items() if entry["method"] == method]
    entry = modules[names[0]]
    rank = max(modules[name]["rank"] for name in names)
    return ADAPTERS.get(method).make_shared({name: bases[name] for name in names}, rank, entry["options"])


def load_adapter(base_model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Put the adapter saved in ``directory`` onto ``base_model`` (in place) as ``adapter_name`` and
    return it. On a model that already holds adapters, a new name adds it beside them (it becomes
    the active adapter); a name that exists is refused."""
    check_adapter_name(adapter_name)
    path = Path(directory)
    config = _read_config(path)
    tensors = _read_tensors(path)
    refuse_adapted(base_model, "load an adapter", adapter_name)
    modules, tied = config["modules"], config.get("tied", {})
    bases = _check_base(base_model, modules)
    shared = {method: _shared_tensors(method, bases, modules) for method in {e["method"] for e in modules.values()}}
    layers = {
        name: build_layer(entry["method"], bases[name], entry["rank"], entry["alpha"], name, entry["options"],
                          shared[entry["method"]], adapter_name)
        for name, entry in modules.items()
    }
    _check_keys(layers, tensors, tied)
    # Nothing in base_model has changed so far; from here on only valid data is written.
    _copy_tensors(layers, tensors, tied)
    for name, layer in layers.items():
        layer.siblings = existing_layers(base_model, name)
    rewrite_bases(layers.values())
    install_layers(base_model, layers, adapter_name)
    return base_model
