"""Parametrisations for training from scratch: the contract and ``parametrize``.

A parametrisation replaces each targeted dense ``nn.Linear`` of a (freshly initialised)
model by a module with fewer trainable parameters -- e.g. ``W = B A`` of rank ``r``. The
dense layer is only read for its shape, dtype, device, bias and the scale of its init.

**Adding a method** = one file with a :class:`Parametrisation` subclass registered in
``PARAMETRISATIONS``: ``__init__(rank, **options)`` validates the options, :meth:`check`
validates one layer (rank bounds), :meth:`build` returns the replacement module.
``parametrize`` checks every layer before it builds any and builds all before it swaps
any, so a bad call leaves the model untouched.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any

from torch import nn

from rankwise.errors import RankwiseError
from rankwise.nn import select_linear_layers
from rankwise.registry import Registry
from rankwise.targets import Targets, replace_module


class Parametrisation(ABC):
    """Builds the replacement of one dense Linear layer; ``rank`` is the per-layer rank."""

    def __init__(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise RankwiseError(f"rank must be a positive integer, got {rank!r}")
        self.rank = rank

    def check(self, name: str, linear: nn.Linear) -> None:
        """Raise RankwiseError if this layer cannot take the parametrisation."""
        limit = min(linear.in_features, linear.out_features)
        if self.rank > limit:
            raise RankwiseError(
                f"rank {self.rank} exceeds min(out, in) = {limit} of {name} "
                f"({linear.out_features} x {linear.in_features}); "
                f"use rank <= {limit} or leave that layer out of targets"
            )

    @abstractmethod
    def build(self, name: str, linear: nn.Linear) -> nn.Module:
        """The module that replaces ``linear`` (called only after :meth:`check` passed)."""


PARAMETRISATIONS: Registry[type[Parametrisation]] = Registry("pretraining parametrisation")


def parametrize(
    model: nn.Module, name: str, *, rank: int, targets: Targets = "all-linear", **options: Any
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by parametrisation ``name``.

    Modifies ``model`` in place and returns it; on any error the model is unchanged.
    """
    cls = PARAMETRISATIONS.get(name)
    try:
        inspect.signature(cls).bind(rank, **options)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "rank")]
        raise RankwiseError(
            f"pretraining parametrisation {name!r}: {exc}; accepted options: {', '.join(accepted) or '(none)'}"
        ) from None
    method = cls(rank, **options)
    layers = {n: model.get_submodule(n) for n in select_linear_layers(model, targets)}
    for layer_name, linear in layers.items():
        method.check(layer_name, linear)
    replacements = {layer_name: method.build(layer_name, linear) for layer_name, linear in layers.items()}
    for layer_name, module in replacements.items():
        replace_module(model, layer_name, module.train(layers[layer_name].training))
    return model
