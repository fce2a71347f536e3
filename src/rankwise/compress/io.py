"""Saving and loading a compressed model as it is (factors, smaller matrices), never the dense model put back.

A directory written by :func:`save_compressed` holds

- ``config.json`` -- the model's transformers config (``config.save_pretrained``), with
  ``architectures`` set to the model's class so the same class is rebuilt;
- ``rankwise_compressed.json`` -- format tag, parameter dtype, one entry per compressed
  module (``kind`` plus what rebuilds its empty shell: for a
  :class:`~rankwise.nn.FactorizedLinear` its ``in_features``, ``out_features``, ``rank``, ``bias``
  and ``source_kind``), and the compression summary (per-layer ranks, storage and ratios);
- ``rankwise_compressed.safetensors`` -- the state dict (shared tensors stored once).

The weights file deliberately does not carry a name transformers looks for: ``AutoModel*.
from_pretrained(<dir>)`` refuses the directory ("no file named model.safetensors ...") instead
of loading the architecture with the factorised layers silently re-initialised. Use
:func:`load_compressed`, or ``rankwise.densify`` then ``save_pretrained`` for a plain HF copy.

:func:`load_compressed` builds the architecture from the config with transformers' own class
(named in ``config.architectures``, else ``AutoModelForCausalLM``, else ``AutoModel``) with its
parameters on the meta device (``accelerate.init_empty_weights``; buffers such as rotary
frequencies are real), swaps in empty shells of the saved shapes, checks every tensor's name
and shape against the file, then assigns the file's tensors (``load_state_dict(assign=True)``)
and re-ties tied weights: no dense copy of the model is ever materialised. Only JSON and
safetensors are read; nothing is unpickled.

Module kinds other than ``"factorized"`` (MoDeGPT's structured modules) register a shell
builder with :func:`register_shell` and describe themselves through ``compressed_spec()``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.files import read_json_object
from rankwise.layers import features
from rankwise.nn import FactorizedLinear
from rankwise.targets import replace_module

CONFIG_FILE = "config.json"
MANIFEST_FILE = "rankwise_compressed.json"
WEIGHTS_FILE = "rankwise_compressed.safetensors"
FORMAT = "rankwise-compressed/2"

#: kind -> builder(spec, module it replaces, dtype) of an empty shell (called on the meta device)
ShellBuilder = Callable[[dict[str, Any], nn.Module, torch.dtype], nn.Module]
_SHELLS: dict[str, ShellBuilder] = {}


def register_shell(kind: str, builder: ShellBuilder) -> None:
    """Let :func:`load_compressed` rebuild modules whose ``compressed_spec()["kind"]`` is ``kind``."""
    _SHELLS[kind] = builder


def _factorized_shell(spec: dict[str, Any], dense: nn.Module, dtype: torch.dtype) -> nn.Module:
    if features(dense) != (spec["out_features"], spec["in_features"]):
        raise RankwiseError(f"saved layer {spec} does not match {dense} of the rebuilt architecture")
    return FactorizedLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], dtype=dtype,
                            source_kind=spec.get("source_kind", "linear"))


register_shell("factorized", _factorized_shell)


def _describe(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, FactorizedLinear):
        return {"kind": "factorized", "in_features": module.in_features, "out_features": module.out_features,
                "rank": module.rank, "bias": module.bias is not None, "source_kind": module.source_kind}
    spec = getattr(module, "compressed_spec", None)
    return spec() if callable(spec) else None


def compressed_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: spec}`` of every compressed module (outermost ones only)."""
    found: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") for parent in found):
            continue
        spec = _describe(module)
        if spec is not None:
            found[name] = spec
    return found


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return max(set(floating), key=floating.count) if floating else torch.float32


def save_compressed(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (a transformers model compressed by ``rankwise.compress``) to ``directory``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise RankwiseError(
            "save_compressed needs a transformers model (with a .config); "
            f"got {type(model).__name__} without one -- save its state_dict with safetensors instead"
        )
    modules = compressed_modules(model)
    summary = getattr(model, "rankwise_compression", None)
    if not modules and not isinstance(summary, dict):
        raise RankwiseError(
            "the model has no compressed layers; compress it first (rankwise.compress) "
            "or save it with model.save_pretrained"
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RankwiseError(f"{directory} exists and is not a directory; choose a directory path")

    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    manifest: dict[str, Any] = {"format": FORMAT, "dtype": str(_parameter_dtype(model)).removeprefix("torch."),
                                "modules": modules}
    if isinstance(summary, dict):
        manifest["compression"] = summary

    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT}, force_contiguous=True)
    return directory


def _read_manifest(directory: Path) -> dict[str, Any]:
    manifest = read_json_object(directory, MANIFEST_FILE, what="compressed-model directory",
                                fix="pass a directory written by save_compressed")
    if not isinstance(manifest.get("modules"), dict) or manifest.get("format") != FORMAT:
        raise RankwiseError(f"{directory / MANIFEST_FILE} is not a {FORMAT} manifest; re-save with save_compressed")
    dtype = getattr(torch, str(manifest.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise RankwiseError(f"{directory / MANIFEST_FILE} names an unknown dtype {manifest.get('dtype')!r}")
    unknown = sorted({spec.get("kind") for spec in manifest["modules"].values() if isinstance(spec, dict)} - set(_SHELLS))
    if unknown or not all(isinstance(spec, dict) for spec in manifest["modules"].values()):
        raise RankwiseError(f"{directory / MANIFEST_FILE} holds modules of unknown kinds {unknown}; "
                            f"known: {', '.join(sorted(_SHELLS))}")
    return manifest


def _architecture(directory: Path) -> Callable[[], nn.Module]:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ... for bad configs
        raise RankwiseError(f"cannot read the model config in {directory}: {exc}") from None
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return lambda: cls(config)

    def from_auto() -> nn.Module:
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                return auto.from_config(config)
            except ValueError:
                continue
        raise RankwiseError(f"transformers cannot build a model for the config in {directory} ({type(config).__name__})")

    return from_auto


def _install_shells(model: nn.Module, modules: dict[str, Any], dtype: torch.dtype) -> None:
    shells: dict[str, nn.Module] = {}
    for name, spec in modules.items():
        try:
            original = model.get_submodule(name)
            shells[name] = _SHELLS[spec["kind"]](spec, original, dtype)
        except (AttributeError, KeyError, TypeError):
            raise RankwiseError(f"saved module {name!r} does not fit the architecture rebuilt from config.json") from None
    for name, shell in shells.items():
        replace_module(model, name, shell)


def _check_weights(model: nn.Module, path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError on damaged files
        raise RankwiseError(f"{path} is not a readable safetensors file ({exc}); re-save the model") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k}: file {shape} vs model {expected[k]}" for k, shape in shapes.items()
             if k in expected and shape != expected[k]]
    unexpected = sorted(set(shapes) - set(expected))
    if wrong or unexpected:
        raise RankwiseError(f"{path} does not match the saved ranks/config: "
                            + "; ".join(wrong[:5] + [f"unexpected {k}" for k in unexpected[:5]]))


def _with_shared_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus every name of a tied parameter group (safetensors stores one name per group)."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    state = dict(state)
    for names in groups.values():
        stored = next((name for name in names if name in state), None)
        if stored is not None:
            state.update({name: state[stored] for name in names})
    return state


def load_compressed(directory: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save_compressed` (eval mode, CPU, saved dtype)."""
    from accelerate import init_empty_weights

    directory = Path(directory)
    if not directory.is_dir():
        raise RankwiseError(f"{directory} is not a directory written by save_compressed")
    missing = [f for f in (CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE) if not (directory / f).is_file()]
    if missing:
        raise RankwiseError(f"{directory} lacks {', '.join(missing)}; it was not written by save_compressed")
    manifest = _read_manifest(directory)
    dtype = getattr(torch, manifest["dtype"])
    build = _architecture(directory)
    with init_empty_weights(include_buffers=False):
        model = build()
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # on the meta tensors (outside the context, which would re-create them): groups known
    with init_empty_weights(include_buffers=False):
        _install_shells(model, manifest["modules"], dtype)
    _check_weights(model, directory / WEIGHTS_FILE)
    state = load_file(str(directory / WEIGHTS_FILE))
    model.load_state_dict(_with_shared_names(model, state), strict=False, assign=True)
    for name, buffer in model.named_buffers():
        # buffers not in the file (rotary frequencies) follow the model's dtype, as model.to(dtype) cast them
        if name not in state and buffer.is_floating_point() and not buffer.is_meta:
            module, _, leaf = name.rpartition(".")
            model.get_submodule(module)._buffers[leaf] = buffer.to(dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # one Parameter again for each tied group, as transformers builds it
    empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if empty:
        raise RankwiseError(f"{directory / WEIGHTS_FILE} lacks {', '.join(empty[:5])}; re-save the model")
    if "compression" in manifest:
        model.rankwise_compression = manifest["compression"]
    return model.eval()
