"""Several named adapters on one model: switching, switching off, deleting (PEFT's words).

``adapt`` / ``load_adapter`` / ``import_peft`` / ``add_weighted_adapter`` with a new
``adapter_name`` add an adapter beside the ones a model holds (see :mod:`rankwise.adapters.api`);
this module chooses among them:

- :func:`set_adapter` makes one the active adapter: only its layers add their update and train;
  the others are frozen and, if they rewrote the base (PiSSA, OLoRA, CorDA, ...), add back what
  they moved out of it, so the active adapter acts on the original weight;
- :func:`disable_adapter` is a context manager in which no adapter adds its update: the outputs
  are the base model's (up to the fp32 rounding of a rewritten weight plus its offset);
- :func:`delete_adapter` removes one, writing its base rewrite back into the weight.

Merged adapters are in the weights, not in the forward: switching or disabling needs
``rankwise.unmerge(model)`` first.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from rankwise.errors import RankwiseError
from rankwise.adapters.api import (
    activate,
    active_adapter,
    adapter_names,
    all_inactive,
    refuse_merged,
    remove_adapter_layers,
    require_adapters,
    restore_flags,
)


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make ``adapter_name`` the active adapter (its parameters trainable, the others frozen)."""
    require_adapters(model, f"set adapter {adapter_name!r}", adapter_name)
    refuse_merged(model, f"switch to adapter {adapter_name!r}")
    activate(model, adapter_name)
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_adapter(model): ...`` runs the base model: no adapter adds its update, and the
    ones that rewrote the base add back what they moved out of it. Trainable flags are unchanged."""
    require_adapters(model, "disable the adapters")
    refuse_merged(model, "disable the adapters")
    with all_inactive(model):
        yield model


def delete_adapter(model: nn.Module, adapter_name: str, *, allow_lossy: bool = False) -> nn.Module:
    """Remove adapter ``adapter_name`` without merging it (a base rewrite is written back into the
    weight: lossy on a quantized base, so only with ``allow_lossy=True``). When it was the active
    adapter, the first remaining one becomes active; when it was the last, the plain model is back
    with its ``requires_grad`` flags from before the first adapter."""
    layers = require_adapters(model, f"delete adapter {adapter_name!r}", adapter_name)
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RankwiseError(
            f"cannot delete adapter {adapter_name!r}: it is merged into the base weights of {', '.join(merged[:3])}; "
            "call rankwise.unmerge(model) first (or rankwise.unload(model) to keep it in the weights)"
        )
    for layer in layers.values():
        if layer.rewrites_base:
            layer.refuse_lossy("write the base rewrite back", allow_lossy)
    was_active = active_adapter(model) == adapter_name
    for layer in layers.values():
        layer.undo_base_rewrite()
    remove_adapter_layers(model, adapter_name)
    remaining = adapter_names(model)
    if not remaining:
        restore_flags(model)
    elif was_active:
        activate(model, remaining[0])
    return model
