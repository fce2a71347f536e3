"""Training-time hooks of adapter methods, called by the training loop.

Some methods act during training, not only at init:

- a loss term: a layer defines ``regularization(self) -> Tensor | None`` (SORSA's
  orthonormal regulariser, AdaLoRA's orthogonality penalty); :func:`regularization_loss`
  sums them over the model and the loop adds the sum to the task loss;
- a schedule after each optimizer step: a method class defines the classmethod
  ``after_step(layers, *, step, total_steps, optimizer)`` (AdaLoRA / IncreLoRA budget
  changes, SoRA's proximal gate update); :func:`after_step` calls it once per method class
  present, with all of that class's layers (keyed by module name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.api import adapter_layers
from rankwise.adapters.base import AdapterLayer


def regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of every adapter layer's ``regularization()``; None when no layer has one."""
    terms = []
    for layer in adapter_layers(model).values():
        term = layer.regularization() if hasattr(layer, "regularization") else None
        if term is not None:
            terms.append(term)
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None


def after_step(model: nn.Module, *, step: int, total_steps: int, optimizer: Any = None) -> None:
    """Run each method's ``after_step`` schedule once, with all of its layers."""
    by_class: dict[type, dict[str, AdapterLayer]] = {}
    for name, layer in adapter_layers(model).items():
        by_class.setdefault(type(layer), {})[name] = layer
    for cls, layers in by_class.items():
        hook = getattr(cls, "after_step", None)
        if hook is not None:
            hook(layers, step=step, total_steps=total_steps, optimizer=optimizer)
