"""Hugging Face PEFT's LoRA adapter format: the facts export, import and validation share.

On disk a PEFT LoRA adapter is ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors`` with one pair of tensors per adapted layer::

    base_model.model.<module path>.lora_A.weight     r x in    (Linear, Conv1D, bitsandbytes Linear)
    base_model.model.<module path>.lora_B.weight     out x r
    base_model.model.<module path>.lora_A.weight     r x in_channels x kh x kw   (Conv2d: k x k conv down)
    base_model.model.<module path>.lora_B.weight     out_channels x r x 1 x 1    (then 1 x 1 conv up)
    base_model.model.<module path>.lora_embedding_A  r x num_embeddings          (Embedding)
    base_model.model.<module path>.lora_embedding_B  embedding_dim x r

The factors of a GPT-2 ``Conv1D`` are the same as a Linear's (PEFT transposes the delta on
merge): ``fan_in_fan_out: true`` in the config says so, and PEFT sets it per layer type anyway.

and PEFT computes ``W0 x + s B A x`` on the ORIGINAL weight ``W0``, with ``s = alpha / r``
(``alpha / sqrt(r)`` under ``use_rslora``); ``r`` / ``alpha`` come from ``rank_pattern`` /
``alpha_pattern`` when a key matches the module path, else from ``r`` / ``lora_alpha``.
Writing: :mod:`rankwise.adapters.peft_export`; reading: :mod:`rankwise.adapters.peft_import`
(after :mod:`rankwise.adapters.peft_validation`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from rankwise.layers import layer_kind

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
FACTOR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
#: LoraConfig defaults of ``r`` and ``lora_alpha`` (a config may omit them)
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8


def factor_key(module: str, factor: str, kind: str | None = None) -> str:
    """``base_model.model.<module>.lora_<factor>.weight`` (``.lora_embedding_<factor>`` for an embedding)."""
    if kind == "embedding":
        return f"{KEY_PREFIX}{module}.lora_embedding_{factor}"
    return f"{KEY_PREFIX}{module}.lora_{factor}.weight"


def peft_layout(tensor: torch.Tensor, factor: str, module: nn.Module) -> torch.Tensor:
    """A factor in the ``out x in`` view (``A`` k x in, ``B`` out x k) shaped as PEFT stores it for
    ``module``: 4-D kernels for Conv2d, unchanged otherwise."""
    if layer_kind(module) != "conv2d":
        return tensor
    if factor == "A":
        return tensor.reshape(tensor.shape[0], *module.weight.shape[1:])
    return tensor.reshape(*tensor.shape, 1, 1)


def matrix_layout(tensor: torch.Tensor) -> torch.Tensor:
    """A PEFT factor as a matrix (``A`` k x in, ``B`` out x k): Conv2d kernels flattened."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.ndim > 2 else tensor


def pattern_key(name: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key matching module ``name`` only.

    PEFT matches pattern keys with ``re.match(rf"(.*\\.)?({key})$", module path)``. The
    escaped path anchored with ``^`` matches that module only, never a longer path ending in
    ``.<name>``.
    """
    return "^" + re.escape(name)


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the value of the first pattern key matching a dot-delimited suffix of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
