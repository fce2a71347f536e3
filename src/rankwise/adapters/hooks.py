"""Training-time hooks of adapter methods, called by the training loop.

Some methods act during training, not only at init. Both hooks are declared with no-op
defaults on :class:`~rankwise.adapters.base.AdapterLayer`:

- a loss term: ``regularization(self) -> Tensor | None`` (SORSA's orthonormal regulariser,
  AdaLoRA's orthogonality penalty); :func:`regularization_loss` sums them over the model and
  the loop adds the sum to the task loss;
- a schedule after each optimizer step: the classmethod ``after_step(layers, *, step,
  total_steps, optimizer)`` (AdaLoRA / IncreLoRA budget changes, SoRA's proximal gate
  update, DyLoRA's rank sampling); :func:`after_step` calls it once per method class present,
  with all of that class's layers (keyed by module name).

:func:`effective_ranks` reads the ``effective_rank()`` hook of the methods that prune or grow
ranks; :func:`refuse_merged` and :func:`check_total_steps` are the checks their schedules share.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.api import adapter_layers
from rankwise.adapters.base import AdapterLayer
from rankwise.errors import RankwiseError
from rankwise.options import Option


def regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of every adapter layer's ``regularization()``; None when no layer has a term."""
    terms = [term for layer in adapter_layers(model).values() if (term := layer.regularization()) is not None]
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None


def after_step(model: nn.Module, *, step: int, total_steps: int, optimizer: Any = None) -> None:
    """Run each method's ``after_step`` schedule once, with all of its layers."""
    by_class: dict[type[AdapterLayer], dict[str, AdapterLayer]] = {}
    for name, layer in adapter_layers(model).items():
        by_class.setdefault(type(layer), {})[name] = layer
    for cls, layers in by_class.items():
        cls.after_step(layers, step=step, total_steps=total_steps, optimizer=optimizer)


def effective_ranks(model: nn.Module) -> dict[str, int]:
    """``{module name: effective rank}`` of every adapter layer that reports one
    (SoRA: non-zero gates; AdaLoRA / IncreLoRA: triplets in use)."""
    ranks = {name: layer.effective_rank() for name, layer in adapter_layers(model).items()}
    return {name: rank for name, rank in ranks.items() if rank is not None}


def refuse_merged(layers: dict[str, AdapterLayer], method: str) -> None:
    """A schedule that changes factors or masks cannot run on merged layers (unmerge would undo the wrong delta)."""
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RankwiseError(
            f"{method} cannot run its training schedule on merged layers ({', '.join(merged[:3])}); "
            "call rankwise.unmerge(model) before training"
        )


def check_total_steps(total_steps: Any, at_least: int, method: str, remedy: str) -> None:
    """``total_steps`` must be an integer >= ``at_least`` for a schedule planned over the run."""
    try:
        Option(at_least, int, low=at_least, help="steps of the run").check("total_steps", total_steps, method)
    except RankwiseError as exc:
        raise RankwiseError(f"{exc}; {remedy}") from None
