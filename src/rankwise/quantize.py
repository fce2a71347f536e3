"""``rankwise.quantize``: put a model's Linear-like layers on a bitsandbytes 4-bit or 8-bit base.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314)
trains adapters over a frozen base stored in 4 bits. ``quantize(model, "nf4")`` replaces every
targeted ``nn.Linear`` / GPT-2 ``Conv1D`` by a ``bitsandbytes.nn.Linear4bit`` holding its weight
as NF4 codes (4-bit NormalFloat, blockwise absmax over ``blocksize`` values; ``double_quant``
also quantizes the absmax constants: QLoRA's double quantization), ``"fp4"`` by 4-bit floats,
``"int8"`` by a ``Linear8bitLt`` (int8 rows with one absmax scale each, LLM.int8() without the
outlier threshold). The layer computes in ``compute_dtype`` (default: the weight's dtype).
It is what ``transformers``' ``BitsAndBytesConfig(load_in_4bit=True, ...)`` does at load time,
for a model already in memory, on CPU or CUDA (the weight's device).

On a model that holds adapters it quantizes the adapters' base layers, which are the residuals
of the methods that rewrite the base: adapt PiSSA in full precision, then quantize, and the
residual ``W - B A`` is what gets quantized -- the PiSSA paper's QPiSSA, whose quantization
error is smaller than the plain weight's because the principal part stays in the adapter.
Afterwards the adapters train over the quantized base as over any other (merges into it are
lossy: ``rankwise.merge(model, allow_lossy=True)``).

Bias, embeddings, norms and the output head (``"all-linear"`` leaves it out, as PEFT) stay in
their dtype. Weights tied to another module are refused (quantizing one side would untie them).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.adapters.api import base_of, layers_of, match_adaptable
from rankwise.adapters.base import AdapterLayer, AdapterSet
from rankwise.errors import RankwiseError
from rankwise.layers import DENSE_KINDS, SCHEMES, dense_weight, layer_kind, quantized_linear
from rankwise.options import Option
from rankwise.targets import Targets, replace_module

BLOCKSIZE = Option(64, int, choices=(64, 128, 256, 512, 1024, 2048, 4096),
                   help="values per absmax block of the 4-bit schemes")
DOUBLE_QUANT = Option(True, bool, help="quantize the absmax constants too (QLoRA's double quantization)")


def quantize(
    model: nn.Module,
    scheme: str = "nf4",
    *,
    targets: Targets = "all-linear",
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = True,
    blocksize: int = 64,
) -> nn.Module:
    """Replace the ``targets`` Linear-like layers of ``model`` (in place) by bitsandbytes layers
    holding their weights quantized with ``scheme`` (``"nf4"``, ``"fp4"`` or ``"int8"``); return
    ``model``. Every check runs before the model changes."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RankwiseError("rankwise.quantize needs bitsandbytes: pip install bitsandbytes") from None
    if scheme not in SCHEMES:
        raise RankwiseError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    DOUBLE_QUANT.check("double_quant", double_quant, "quantize")
    BLOCKSIZE.check("blocksize", blocksize, "quantize")
    if compute_dtype is not None and compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RankwiseError(f"compute_dtype must be torch.float32, torch.bfloat16 or torch.float16, got {compute_dtype!r}")
    names = match_adaptable(model, targets)
    layers = {name: base_of(model.get_submodule(name)) for name in names}
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    todo = {}
    for name, layer in layers.items():
        kind = layer_kind(layer)
        if kind not in DENSE_KINDS:
            if kind in ("linear4bit", "linear8bit"):
                continue  # already quantized
            raise RankwiseError(f"cannot quantize {name!r}: it is a {type(layer).__name__}; quantize takes nn.Linear "
                                "and Conv1D layers (exclude it from targets)")
        if len(owners.get(id(layer.weight), [])) > 1:
            raise RankwiseError(f"the weight of {name!r} is tied to another module; exclude it from targets "
                                "(quantizing one side would untie them)")
        merged = [layer for layer in _adapters_on(model.get_submodule(name)) if layer.merged]
        if merged:
            raise RankwiseError(f"{name!r} holds a merged adapter; call rankwise.unmerge(model) before quantizing")
        todo[name] = layer
    if not todo:
        raise RankwiseError(f"targets {targets!r} selected no full-precision Linear or Conv1D layer to quantize")
    with torch.no_grad():
        built = {
            name: quantized_linear(dense_weight(layer), layer.bias, scheme,
                                   compute_dtype=compute_dtype or layer.weight.dtype,
                                   double_quant=double_quant, blocksize=blocksize)
            for name, layer in todo.items()
        }
    for name, quantized in built.items():
        quantized.train(todo[name].training)
        _swap_base(model, name, quantized)
    return model


def _adapters_on(module: nn.Module) -> list[AdapterLayer]:
    return list(layers_of(module).values()) if isinstance(module, (AdapterLayer, AdapterSet)) else []


def _swap_base(model: nn.Module, name: str, quantized: nn.Module) -> None:
    """Put ``quantized`` where the (base) layer ``name`` was, inside its adapters when it has any."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterSet):
        module.base = quantized
        for layer in module.adapters.values():
            object.__setattr__(layer, "base", quantized)
            layer.kind = layer_kind(quantized)
    elif isinstance(module, AdapterLayer):
        module.base = quantized
        module.kind = layer_kind(quantized)
    else:
        replace_module(model, name, quantized)

