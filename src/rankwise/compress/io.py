"""Saving and loading a factorised model as factorised weights (not the dense model put back).

A directory written by :func:`save_compressed` holds

- ``config.json`` -- the model's transformers config (``config.save_pretrained``), with
  ``architectures`` set to the model's class so the same class is rebuilt;
- ``rankwise_factorized.json`` -- format tag, parameter dtype, and for every
  :class:`~rankwise.nn.FactorizedLinear` its ``in_features``, ``out_features``, ``rank``
  and ``bias``; plus the compression summary when ``compress`` produced the model;
- ``model.safetensors`` -- the state dict with the factors ``<layer>.down.weight`` /
  ``<layer>.up.weight`` (shared tensors stored once, via ``safetensors.torch.save_model``).

:func:`load_compressed` rebuilds the architecture from the config with transformers (class
named in ``config.architectures``, else ``AutoModelForCausalLM``, else ``AutoModel``), puts
FactorizedLinear shells of the saved ranks in place, validates every tensor's name and
shape, and loads the weights. Only JSON and safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.files import read_json_object
from rankwise.nn import FactorizedLinear
from rankwise.targets import replace_module

CONFIG_FILE = "config.json"
LAYERS_FILE = "rankwise_factorized.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "rankwise-factorized/1"


def _factorized_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "rank": m.rank,
            "bias": m.bias is not None,
        }
        for name, m in model.named_modules()
        if isinstance(m, FactorizedLinear)
    }


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return max(set(floating), key=floating.count) if floating else torch.float32


def save_compressed(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (a transformers model containing FactorizedLinear layers) to ``directory``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise RankwiseError(
            "save_compressed needs a transformers model (with a .config); "
            f"got {type(model).__name__} without one -- save its state_dict with safetensors instead"
        )
    layers = _factorized_layers(model)
    if not layers:
        raise RankwiseError(
            "the model has no FactorizedLinear layers; compress it first (rankwise.compress.compress) "
            "or save it with model.save_pretrained"
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RankwiseError(f"{directory} exists and is not a directory; choose a directory path")

    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    manifest = {
        "format": FORMAT,
        "dtype": str(_parameter_dtype(model)).removeprefix("torch."),
        "layers": layers,
    }
    summary = getattr(model, "rankwise_compression", None)
    if isinstance(summary, dict):
        manifest["compression"] = summary

    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    (directory / LAYERS_FILE).write_text(json.dumps(manifest, indent=2))
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT}, force_contiguous=True)
    return directory


def _read_manifest(directory: Path) -> dict[str, Any]:
    manifest = read_json_object(directory, LAYERS_FILE, what="compressed-model directory",
                                fix="pass a directory written by save_compressed")
    if not isinstance(manifest.get("layers"), dict) or manifest.get("format") != FORMAT:
        raise RankwiseError(f"{directory / LAYERS_FILE} is not a {FORMAT} manifest; re-save with save_compressed")
    dtype = getattr(torch, str(manifest.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise RankwiseError(f"{directory / LAYERS_FILE} names an unknown dtype {manifest.get('dtype')!r}")
    return manifest


def _build_architecture(directory: Path) -> nn.Module:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for bad configs
        raise RankwiseError(f"cannot read the model config in {directory}: {exc}") from None
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls(config)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto.from_config(config)
        except ValueError:
            continue
    raise RankwiseError(f"transformers cannot build a model for the config in {directory} ({type(config).__name__})")


def _install_shells(model: nn.Module, layers: dict[str, Any], dtype: torch.dtype) -> None:
    shells: dict[str, FactorizedLinear] = {}
    for name, spec in layers.items():
        try:
            dense = model.get_submodule(name)
            shape = (spec["in_features"], spec["out_features"], spec["rank"], spec["bias"])
        except (AttributeError, KeyError, TypeError):
            raise RankwiseError(
                f"saved layer {name!r} does not fit the architecture rebuilt from config.json"
            ) from None
        if not isinstance(dense, nn.Linear) or (dense.in_features, dense.out_features, spec["bias"]) != (
            shape[0], shape[1], dense.bias is not None
        ):
            raise RankwiseError(f"saved layer {name!r} {spec} does not match {dense} of the rebuilt architecture")
        shells[name] = FactorizedLinear(*shape[:3], bias=shape[3], dtype=dtype)
    for name, shell in shells.items():
        replace_module(model, name, shell)


def _check_weights(model: nn.Module, path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError on damaged files
        raise RankwiseError(f"{path} is not a readable safetensors file ({exc}); re-save the model") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [
        f"{k}: file {shape} vs model {expected[k]}" for k, shape in shapes.items() if k in expected and shape != expected[k]
    ]
    if wrong:
        raise RankwiseError(f"{path} does not match the saved ranks/config: " + "; ".join(wrong[:5]))


def load_compressed(directory: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save_compressed` (eval mode, CPU, saved dtype)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RankwiseError(f"{directory} is not a directory written by save_compressed")
    missing = [f for f in (CONFIG_FILE, LAYERS_FILE, WEIGHTS_FILE) if not (directory / f).is_file()]
    if missing:
        raise RankwiseError(f"{directory} lacks {', '.join(missing)}; it was not written by save_compressed")
    manifest = _read_manifest(directory)
    dtype = getattr(torch, manifest["dtype"])
    model = _build_architecture(directory).to(dtype)
    _install_shells(model, manifest["layers"], dtype)
    _check_weights(model, directory / WEIGHTS_FILE)
    absent, unexpected = load_model(model, str(directory / WEIGHTS_FILE), strict=False)
    if absent or unexpected:
        raise RankwiseError(
            f"{directory / WEIGHTS_FILE} does not match the architecture: missing {sorted(absent)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if "compression" in manifest:
        model.rankwise_compression = manifest["compression"]
    return model.eval()
