"""The reference packages' optimizers, built for the same set-up as a rankwise optimizer.

The ``optim`` bench suite runs each reference next to its rankwise counterpart on the same
model, targets, rank, refresh gap, scale and AdamW hyperparameters, so the table compares
implementations, not settings. The references are optional (the ``test`` extra installs
them); a missing one is skipped with a note. Their state holds Python projector objects
(galore-torch, fira) whose matrices :func:`rankwise.optim.state_bytes` would not see, so
their state is measured by :func:`reference_state_bytes`, which walks into objects.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from rankwise.errors import RankwiseError


@dataclass(frozen=True)
class Reference:
    """A reference package's optimizer and how a rankwise set-up maps onto its group keys."""

    package: str  # what pip installs
    module: str
    class_name: str
    counterpart: str  # the rankwise optimizer it is compared with (its default scale is used)
    scale_key: str  # the group key of the scale, in both packages
    group_keys: Callable[[int, int, float, str], dict[str, Any]]  # (rank, gap, scale, proj_type) -> keys


REFERENCES: dict[str, Reference] = {
    "galore-torch": Reference(
        "galore-torch", "galore_torch", "GaLoreAdamW", "galore", "scale",
        lambda rank, gap, scale, proj: {"rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj},
    ),
    "fira": Reference(
        "fira", "fira", "FiraAdamW", "fira", "alpha",
        lambda rank, gap, scale, proj: {"rank": rank, "update_proj_gap": gap, "alpha": scale, "proj_type": proj},
    ),
    "apollo-torch": Reference(
        "apollo-torch", "apollo_torch", "APOLLOAdamW", "apollo", "scale",
        lambda rank, gap, scale, proj: {"rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj,
                                        "proj": "random", "scale_type": "channel"},
    ),
}

ADAM_KEYS = ("betas", "eps", "weight_decay", "correct_bias")


def reference(name: str) -> Reference:
    if name not in REFERENCES:
        raise RankwiseError(f"unknown reference optimizer {name!r}; known: {', '.join(REFERENCES)}")
    return REFERENCES[name]


def unavailable_reason(name: str) -> str | None:
    """Why the reference ``name`` cannot run here (not installed), or None."""
    ref = reference(name)
    try:
        importlib.import_module(ref.module)
    except ImportError:
        return f"{ref.package} is not installed (pip install {ref.package})"
    return None


def default_scale(ref: Reference) -> float:
    """The scale the rankwise counterpart uses when none is given (its paper's default)."""
    from rankwise.optim import method_options

    return float(method_options(ref.counterpart)[ref.scale_key].default)


def build_reference(
    model: nn.Module, name: str, *, lr: float, rank: int, targets: Any = "all-linear", **options: Any
) -> torch.optim.Optimizer:
    """The reference optimizer ``name`` with the parameter split of ``rankwise.optim.build``.

    ``options``: ``update_proj_gap`` (default 200), ``scale`` (default: the counterpart's),
    ``proj_type`` (default std) and the AdamW keys ``betas``, ``eps``, ``weight_decay``,
    ``correct_bias``.
    """
    from rankwise.optim import split_parameters

    ref = reference(name)
    accepted = {"update_proj_gap", "scale", "proj_type", *ADAM_KEYS}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise RankwiseError(f"reference {name} takes {', '.join(sorted(accepted))}; got {', '.join(unknown)}")
    reason = unavailable_reason(name)
    if reason:
        raise RankwiseError(reason)
    cls = getattr(importlib.import_module(ref.module), ref.class_name)
    scale = options.get("scale", default_scale(ref))
    keys = ref.group_keys(rank, options.get("update_proj_gap", 200), scale, options.get("proj_type", "std"))
    projected, others = split_parameters(model, targets)
    groups = [{"params": [p for _, p in projected], **keys}]
    if others:
        groups.append({"params": others})
    adam = {k: options[k] for k in ADAM_KEYS if k in options}
    return cls(groups, lr=lr, no_deprecation_warning=True, **adam)


def _tensors(value: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
        yield from _tensors(vars(value), seen)


def reference_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor storage reachable from ``optimizer.state``, inside
    projector objects too (the reference packages keep their projection matrices there)."""
    storages: dict[int, int] = {}
    for tensor in _tensors(list(optimizer.state.values()), set()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
