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
  by ``W``.

bitsandbytes is optional: without it no module is quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.errors import RankwiseError

try:  # transformers is a dependency, but Conv1D's home has moved between versions
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    from transformers.modeling_utils import Conv1D  # type: ignore[no-redef]

LINEAR_KINDS = ("linear", "conv1d", "linear4bit", "linear8bit")
QUANTIZED_KINDS = ("linear4bit", "linear8bit")


def _bnb_kind(module: nn.Module) -> str | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
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
    """``(out_features, in_features)`` of a Linear-like layer."""
    kind = layer_kind(module)
    if kind == "conv1d":
        return module.nf, module.weight.shape[0]
    if kind in LINEAR_KINDS:
        return module.out_features, module.in_features
    raise RankwiseError(f"{type(module).__name__} is not a Linear-like layer (Linear, Conv1D, bitsandbytes Linear)")


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's weight as a dense ``out x in`` tensor (a view for Linear and Conv1D, a new
    dequantised tensor for bitsandbytes layers), in ``dtype`` when given. No gradient flows."""
    kind = layer_kind(module)
    weight = module.weight.detach()
    if kind == "conv1d":
        weight = weight.T
    elif kind == "linear4bit":
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight, module.weight.quant_state)
    elif kind == "linear8bit":
        scales = module.weight.SCB
        if scales is None:  # still holding its float weight (has_fp16_weights or not yet quantized)
            weight = weight.float()
        else:
            weight = weight.float() * (scales.float().unsqueeze(1) / 127.0)
    elif kind != "linear":
        raise RankwiseError(f"{type(module).__name__} is not a Linear-like layer (Linear, Conv1D, bitsandbytes Linear)")
    return weight if dtype is None else weight.to(dtype)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer computes in: the weight's for dense layers, bitsandbytes' compute dtype
    (or float32 when unset) for quantized ones."""
    kind = layer_kind(module)
    if kind == "linear4bit":
        return module.compute_dtype or torch.float32
    if kind == "linear8bit":
        return torch.float32 if module.weight.SCB is not None else module.weight.dtype
    return module.weight.dtype
