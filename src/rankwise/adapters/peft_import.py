"""Loading a Hugging Face PEFT LoRA adapter into rankwise (:func:`import_peft`).

After :mod:`~rankwise.adapters.peft_validation` has checked the directory, the config, the
tensor keys, module paths and shapes -- all before the model is touched -- each module is
wrapped with a rankwise ``lora`` layer with PEFT's per-module ``r`` / ``alpha`` /
``use_rslora`` and the saved factors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rankwise.adapters.api import build_layer, install_layers, refuse_adapted
from rankwise.adapters.base import check_adapter_name
from rankwise.adapters.peft_validation import plan_import, read_peft_config


def import_peft(base_model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Load the PEFT LoRA adapter saved in ``directory`` onto ``base_model`` (in place) and return it.

    Each adapted module becomes a rankwise ``lora`` layer with PEFT's per-module ``r`` and
    ``alpha`` (``rank_pattern`` / ``alpha_pattern``) and ``use_rslora``, so the model computes
    what ``peft.PeftModel.from_pretrained(base_model, directory)`` computes. Every check runs
    before ``base_model`` is modified.
    """
    check_adapter_name(adapter_name)
    path = Path(directory)
    config = read_peft_config(path)
    refuse_adapted(base_model, "import a PEFT adapter", adapter_name)
    plan = plan_import(base_model, path, config)
    options = {"rslora": config.get("use_rslora", False), "dropout": config.get("lora_dropout", 0.0)}
    layers = {
        name: build_layer("lora", entry.module, entry.rank, entry.alpha, name, options)
        for name, entry in plan.items()
    }
    # Nothing in base_model has changed so far; from here on only validated tensors are written.
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(plan[name].lora_A.to(**layer.factory))
            layer.lora_B.copy_(plan[name].lora_B.to(**layer.factory))
    install_layers(base_model, layers, adapter_name)
    return base_model
