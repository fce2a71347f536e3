"""Hugging Face PEFT's LoRA adapter format: the facts export, import and validation share.

On disk a PEFT LoRA adapter is ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors`` with one pair of tensors per adapted ``nn.Linear``::

    base_model.model.<module path>.lora_A.weight     r x in
    base_model.model.<module path>.lora_B.weight     out x r

and PEFT computes ``W0 x + s B A x`` on the ORIGINAL weight ``W0``, with ``s = alpha / r``
(``alpha / sqrt(r)`` under ``use_rslora``); ``r`` / ``alpha`` come from ``rank_pattern`` /
``alpha_pattern`` when a key matches the module path, else from ``r`` / ``lora_alpha``.
Writing: :mod:`rankwise.adapters.peft_export`; reading: :mod:`rankwise.adapters.peft_import`
(after :mod:`rankwise.adapters.peft_validation`).
"""

from __future__ import annotations

import re
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
FACTOR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
#: LoraConfig defaults of ``r`` and ``lora_alpha`` (a config may omit them)
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8


def factor_key(module: str, factor: str) -> str:
    """``base_model.model.<module>.lora_<factor>.weight``."""
    return f"{KEY_PREFIX}{module}.lora_{factor}.weight"


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
