"""The Linear-like layers of real models, seen through one ``out x in`` interface.

Real checkpoints hold more than ``nn.Linear``: GPT-2 and its relatives use transformers'
``Conv1D`` (weight stored ``in x out``, forward ``x @ W + b``), QLoRA bases hold
bitsandbytes ``Linear4bit`` (NF4 / FP4 codes packed two per byte, with a quantisation state)
and ``Linear8bitLt`` (int8 rows with per-row scales). Every pillar reads these layers through
this module, so each works on all of them without knowing their storage:

- :func:`layer_kind` names the kind (``"linear"``, ``"conv1d"``, ``"linear4bit"``,
  ``"linear8bit"``), :func:`is_linear_like` says whether a module is one of them;
- :func:`features` gives ``(out_features, in_features)`` whatever the storage;
- :func:`dense_weight` gives the weight as a dense ``out x in`` tensor (dequantised for
  bitsandbytes layers, transposed for Conv1D), the matrix every formula in rankwise means
  by ``W``; :func:`write_dense_weight` writes such a matrix back (in place for dense
  layers, requantised with the layer's own settings for bitsandbytes layers -- lossy);
- :func:`quantized_linear` builds a bitsandbytes layer from a dense ``out x in`` weight
  (``rankwise.quantize`` and LoftQ use it).

Adapters also take ``nn.Embedding`` and ``nn.Conv2d`` (``ADAPTABLE_KINDS``), seen as the same
kind of matrix: an embedding maps a one-hot vector of size ``num_embeddings`` to
``embedding_dim`` (``W = E^T``, ``embedding_dim x num_embeddings``); a convolution's weight
flattened over ``(in_channels, kh, kw)`` (``out_channels x in_channels * kh * kw``), as PEFT's
LoRA sees them.

bitsandbytes is optional: without it no module is quantized.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError

try:  # transformers is a dependency, but Conv1D's home has moved between versions
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    from transformers.modeling_utils import Conv1D  # type: ignore[no-redef]

LINEAR_KINDS = ("linear", "conv1d", "linear4bit", "linear8bit")
QUANTIZED_KINDS = ("linear4bit", "linear8bit")
DENSE_KINDS = ("linear", "conv1d")
ADAPTABLE_KINDS = LINEAR_KINDS + ("embedding", "conv2d")
#: quantization schemes of :func:`quantized_linear` (bitsandbytes NF4 / FP4 4-bit, LLM.int8() rows)
SCHEMES = ("nf4", "fp4", "int8")


def _bnb_kind(module: nn.Module) -> str | None:
    # No module can be a bitsandbytes layer before bitsandbytes is imported (a 3-5 s import, spared
    # to everyone without a quantized model).
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "linear4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "linear8bit"
    return None


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"linear4bit"``, ``"linear8bit"``, ``"embedding"``, ``"conv2d"``,
    or None for anything else. Quantized layers are named as such although they subclass nn.Linear."""
    quantized = _bnb_kind(module) if isinstance(module, nn.Linear) else None
    if quantized:
        return quantized
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    return None


def is_linear_like(module: nn.Module) -> bool:
    """Linear, Conv1D or a bitsandbytes quantized Linear."""
    return layer_kind(module) in LINEAR_KINDS


def is_quantized(module: nn.Module) -> bool:
    return layer_kind(module) in QUANTIZED_KINDS


def features(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear-like layer (or of an embedding / convolution
    seen as a matrix, see the module docstring)."""
    kind = layer_kind(module)
    if kind == "conv1d":
        return module.nf, module.weight.shape[0]
    if kind in LINEAR_KINDS:
        return module.out_features, module.in_features
    if kind == "embedding":
        return module.embedding_dim, module.num_embeddings
    if kind == "conv2d":
        return module.out_channels, module.weight[0].numel()
    raise RankwiseError(f"{type(module).__name__} is not a Linear-like layer (Linear, Conv1D, bitsandbytes Linear)")


def _unpacked_4bit(module: nn.Module) -> tuple[torch.Tensor, Any]:
    """The 4-bit codes and quant state in bitsandbytes' standard layout (its CPU fast path may
    have repacked them in place for an AVX512-BF16 kernel, which ``dequantize_4bit`` misreads)."""
    weight, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight, state = _convert_weight_packed_for_cpu_inverse(weight, state)
    return weight, state


def _int8_scales(module: nn.Module) -> torch.Tensor | None:
    """Per-row scales of a Linear8bitLt: on the weight until the first forward, then on its state."""
    scales = getattr(module.weight, "SCB", None)
    return scales if scales is not None else getattr(module.state, "SCB", None)


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as a dense ``out x in`` tensor (a view for Linear and Conv1D, a new
    dequantised tensor for bitsandbytes layers), in ``dtype`` when given. No gradient flows."""
    kind = layer_kind(module)
    weight = module.weight.detach()
    if kind in ("conv1d", "embedding"):
        weight = weight.T
    elif kind == "conv2d":
        weight = weight.reshape(weight.shape[0], -1)
    elif kind == "linear4bit":
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(*_unpacked_4bit(module))
    elif kind == "linear8bit":
        scales = _int8_scales(module)
        if scales is None:  # still holding its float weight (has_fp16_weights or not yet quantized)
            weight = weight.float()
        else:
            weight = weight.float() * (scales.float().unsqueeze(1) / 127.0)
    elif kind != "linear":
        raise RankwiseError(f"{type(module).__name__} is not a Linear-like layer (Linear, Conv1D, bitsandbytes Linear)")
    return weight if dtype is None else weight.to(dtype)


def write_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Set the layer's ``out x in`` matrix to ``weight``: copied in place (in the stored dtype and
    layout) for dense layers; quantized again with the layer's own scheme, block size and
    double quantization for bitsandbytes layers -- which rounds it to the nearest codes (lossy)."""
    kind = layer_kind(module)
    with torch.no_grad():
        if kind in QUANTIZED_KINDS:
            template = quantized_linear(weight, None, _scheme_of(module), compute_dtype=compute_dtype(module),
                                        double_quant=getattr(module.weight, "compress_statistics", True),
                                        blocksize=getattr(module.weight, "blocksize", 64) or 64)
            module.weight = template.weight
            if kind == "linear4bit":
                module.weight.module = module
                module.quant_state = template.weight.quant_state
            else:
                module.state.CB, module.state.SCB = None, None  # the next forward reads the new rows
            return
        view = dense_weight(module)
        view.copy_(weight.to(view.dtype))


def _scheme_of(module: nn.Module) -> str:
    return module.weight.quant_type if layer_kind(module) == "linear4bit" else "int8"


def disable_cpu_repacking(module: nn.Module) -> None:
    """Keep a Linear4bit's codes in bitsandbytes' standard layout on CPU.

    In eval mode without gradients, bitsandbytes 0.50 repacks a Linear4bit's codes in place for
    an AVX512-BF16 kernel (and computes in bf16); a later forward in train mode reads the
    repacked codes as if they were not (outputs off by O(1), measured). Adapters switch between
    the two modes, so the codes are unpacked and the fast path turned off (no effect on CUDA)."""
    if layer_kind(module) == "linear4bit":
        with torch.no_grad():
            codes, state = _unpacked_4bit(module)
            module.weight.data, module.weight.quant_state = codes, state
            module.quant_state = state
        module.support_avx512bf16_for_cpu = False


def quantized_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str,
    *,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    blocksize: int = 64,
) -> nn.Module:
    """A bitsandbytes layer computing ``x Q^T + bias`` with ``Q`` the quantized ``weight`` (``out x in``),
    on ``weight``'s device: ``Linear4bit`` for ``"nf4"`` / ``"fp4"`` (blockwise absmax over ``blocksize``
    values; ``double_quant`` quantizes the absmax constants too, QLoRA's double quantization),
    ``Linear8bitLt`` for ``"int8"`` (int8 rows with one absmax scale each, LLM.int8() without outliers)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    out_features, in_features = weight.shape
    device = weight.device
    dense = weight.detach().float().contiguous()
    with torch.no_grad():
        if scheme in ("nf4", "fp4"):
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype,
                                      compress_statistics=double_quant, quant_type=scheme, device="meta")
            codes, state = bnb_functional.quantize_4bit(dense.to(compute_dtype), blocksize=blocksize,
                                                        compress_statistics=double_quant, quant_type=scheme)
            layer.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state, blocksize=blocksize,
                                             compress_statistics=double_quant, quant_type=scheme, module=layer,
                                             bnb_quantized=True)
            layer.quant_state = state
            layer.support_avx512bf16_for_cpu = False  # see disable_cpu_repacking
        elif scheme == "int8":
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                        device="meta")
            rows, scales, _ = bnb_functional.int8_vectorwise_quant(dense.half())
            layer.weight = bnb.nn.Int8Params(rows, requires_grad=False, has_fp16_weights=False, CB=rows, SCB=scales)
        else:
            raise RankwiseError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(device).clone(), requires_grad=False)
    return layer


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer computes in: the weight's for dense layers, bitsandbytes' compute dtype
    (or float32 when unset) for quantized ones."""
    kind = layer_kind(module)
    if kind == "linear4bit":
        return module.compute_dtype or torch.float32
    if kind == "linear8bit":
        return torch.float32 if _int8_scales(module) is not None else module.weight.dtype
    return module.weight.dtype
