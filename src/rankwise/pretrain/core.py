"""Parametrisations for training from scratch: the contract, ``parametrize`` and the options.

A parametrisation replaces each targeted dense ``nn.Linear`` of a (freshly initialised)
model by a module with fewer trainable parameters -- e.g. ``W = B A`` of rank ``r``. The
dense layer is only read for its shape, dtype, device, bias and the scale of its init.

**Adding a method** = one file with a :class:`Parametrisation` subclass registered in
``PARAMETRISATIONS`` (with its family, paper and arXiv id) and imported by
``pretrain/__init__.py``: ``OPTIONS`` declares its keyword options as
:class:`rankwise.options.Option` (the base class checks them once and stores the values in
``self.options``), :meth:`Parametrisation.check` validates one layer (rank bounds) and
:meth:`Parametrisation.build` returns the replacement module. A method that acts during
training (ReLoRA's merge-and-restart) overrides the :class:`~rankwise.training.TrainingHooks`
methods it inherits. :meth:`Parametrisation.apply` checks every layer before it builds any
and builds all before it swaps any, so a bad call leaves the model untouched. Then one row
in ``tests/cases/pretrain_*.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import nn

from rankwise.errors import RankwiseError
from rankwise.nn import select_linear_layers
from rankwise.options import Option, declared_options, resolve
from rankwise.registry import Registry
from rankwise.targets import Targets, replace_module
from rankwise.training import TrainingHooks

#: the per-layer rank every parametrisation takes (a keyword of ``parametrize``, not an option)
RANK = Option(1, int, low=1, help="rank of each replaced layer")


class Parametrisation(TrainingHooks, ABC):
    """Builds the replacement of one dense Linear layer; ``rank`` is the per-layer rank.

    Its training-time hooks (``loss_term``, ``after_step``) do nothing unless a method
    overrides them; the bench installs the instance as a hook of the training loop.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, rank: int, *, method: str = "", **options: Any) -> None:
        self.method = method or type(self).__name__
        owner = f"pretraining parametrisation {self.method!r}"
        self.rank = RANK.check("rank", rank, owner)
        self.options = resolve(declared_options(type(self)), options, owner=owner)

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

    def apply(self, model: nn.Module, targets: Targets = "all-linear") -> nn.Module:
        """Replace the targeted ``nn.Linear`` layers of ``model`` in place; unchanged on any error."""
        layers = {n: model.get_submodule(n) for n in select_linear_layers(model, targets)}
        for layer_name, linear in layers.items():
            self.check(layer_name, linear)
        replacements = {layer_name: self.build(layer_name, linear) for layer_name, linear in layers.items()}
        for layer_name, module in replacements.items():
            replace_module(model, layer_name, module.train(layers[layer_name].training))
        return model


PARAMETRISATIONS: Registry[type[Parametrisation]] = Registry("pretraining parametrisation")


def parametrisation(name: str, *, rank: int, **options: Any) -> Parametrisation:
    """The registered parametrisation ``name`` at ``rank`` with its options checked."""
    return PARAMETRISATIONS.get(name)(rank, method=name, **options)


def parametrize(
    model: nn.Module, name: str, *, rank: int, targets: Targets = "all-linear", **options: Any
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by parametrisation ``name``.

    Modifies ``model`` in place and returns it; on any error the model is unchanged.
    """
    return parametrisation(name, rank=rank, **options).apply(model, targets)


def method_options(name: str) -> dict[str, Option]:
    """The options parametrisation ``name`` declares (``rankwise pretrain --help-method``)."""
    return declared_options(PARAMETRISATIONS.get(name))
