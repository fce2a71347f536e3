"""The three pieces every projected optimizer is built from: projector x inner optimizer x update rule.

Each piece is a small stateless object; the per-parameter state it needs goes into the
``state`` dict it is handed (tensors and plain values only, so checkpoints load with
``torch.load(weights_only=True)``). :class:`rankwise.optim.lowrank.LowRankAdamW` runs them in
one sealed step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from rankwise.linalg.projections import Basis


@dataclass
class RefreshItem:
    """One parameter whose subspace is due: the gradient the projector sees, its state, its seed."""

    grad: torch.Tensor
    state: dict
    seed: int


class Projector(ABC):
    """Chooses a parameter's subspace and materialises it as a :class:`Basis`.

    ``refresh`` writes the subspace into ``state`` under ``proj_*`` keys and must leave
    ``state`` unchanged when it raises :class:`rankwise.linalg.SVDFailure`. Random
    projectors draw from the ``seed`` they are given (combined with ``state["step"]``), store
    the derived integer and regenerate their matrices in ``basis``: never global RNG state.

    A projector with ``batched = True`` also offers ``decompose(items, group) -> [Basis]``
    (several parameters at once, no state written) and ``store(state, basis, grad, group)``,
    with ``refresh = store(decompose([one]))``; the optimizer then decomposes the due
    parameters of a group together.
    """

    batched: bool = False

    @abstractmethod
    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        """Choose a new subspace for ``grad`` and store it in ``state``."""

    @abstractmethod
    def has_basis(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` already holds a subspace."""

    @abstractmethod
    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> Basis:
        """The stored subspace as a :class:`Basis` (regenerated from a seed where one is stored)."""


class InnerOptimizer(ABC):
    """Runs on the (projected) gradient; keeps its moments in ``state``."""

    @abstractmethod
    def update(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
        """Update the moments with ``grad``; return ``(direction, step_size)``."""

    def update_many(
        self, states: Sequence[dict], grads: Sequence[torch.Tensor], group: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, float]]:
        """:meth:`update` for several parameters of one group (overridden by multi-tensor kernels)."""
        return [self.update(state, grad, group) for state, grad in zip(states, grads)]

    def step_many(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict],
        group: Mapping[str, Any],
    ) -> None:
        """``W -= step_size * direction`` for several unprojected parameters (multi-tensor where overridden)."""
        for param, (direction, step_size) in zip(params, self.update_many(states, grads, group)):
            param.add_(direction, alpha=-step_size)

    @abstractmethod
    def reset(self, state: dict) -> None:
        """Forget the moments (the ``reset`` moment policy)."""

    @abstractmethod
    def rotate(self, state: dict, c_left: torch.Tensor | None, c_right: torch.Tensor | None,
               group: Mapping[str, Any]) -> None:
        """Carry the moments into new coordinates ``low_new = C_L low_old C_R`` (``rotate`` policy)."""


@dataclass
class LowRankStep:
    """Everything an update rule may need for one parameter's step."""

    param: torch.Tensor  # the tensor the update is applied to
    grad: torch.Tensor  # its full gradient G (m x n), after prepare_gradient (error feedback included)
    low_grad: torch.Tensor  # L^T G R
    direction: torch.Tensor  # the inner optimizer's output in the subspace
    step_size: float  # the update is applied as W -= step_size * rule.combine(...)
    basis: Basis
    state: dict
    group: Mapping[str, Any]

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        return self.basis.project_back(low)


class UpdateRule(ABC):
    """Turns the step in the subspace into the full-size update of the weight.

    GaLore maps the direction back (``scale * L direction R^T``); Fira adds the scaled
    residual ``G - L L^T G``; APOLLO does not map back at all: it rescales the raw gradient by
    the ratio the subspace step measured; FRUGAL adds a state-free step on the rest.
    """

    @abstractmethod
    def combine(self, step: LowRankStep) -> torch.Tensor:
        """The full-size update of one step (applied as ``W -= step.step_size * update``)."""

    def apply(self, step: LowRankStep, tensor: torch.Tensor, alpha: float) -> None:
        """``tensor += alpha * combine(step)``, the optimizer's entry point; a rule whose update is
        a product overrides it to accumulate the product into ``tensor`` directly."""
        tensor.add_(self.combine(step), alpha=alpha)


@dataclass
class Reparametrised:
    """The tensor a projected step updates and its gradient (by default the weight and ``G``).

    A method that trains the weight through another variable (GradNormLoRP's direction ``v``
    of ``W = g v / ||v||``) returns a subclass carrying what its ``write_back`` needs.
    """

    tensor: torch.Tensor
    grad: torch.Tensor
