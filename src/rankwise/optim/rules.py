"""Update rules and update-side pieces several optimizers share.

- :class:`DropResidual` (GaLore): the part of ``G`` outside the subspace is dropped.
- :class:`ErrorFeedback` with :func:`add_error`: the dropped part is kept in
  ``state["error"]`` and added to the next gradient (DCT-AdamW's ``Xi``, LDAdam's error).
- :func:`limit_norm_growth`: Fira's norm-growth limiter (arXiv 2410.01623), used by Fira on
  its residual and by APOLLO on its update.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from rankwise.optim.pieces import LowRankStep, UpdateRule

GROWTH_LIMIT = 1.01  # Fira's gamma: a norm may grow by at most 1% per step
NORM_GUARD = 1e-8  # keeps the growth ratio finite when the previous norm vanishes
ERROR_KEY = "error"  # state key of the error-feedback buffer


class DropResidual(UpdateRule):
    """GaLore: the residual ``G - L L^T G R R^T`` is dropped; update = ``scale * L direction R^T``."""

    def combine(self, step: LowRankStep) -> torch.Tensor:
        return step.project_back(step.direction) * step.group["scale"]

    def apply(self, step: LowRankStep, tensor: torch.Tensor, alpha: float) -> None:
        step.basis.add_back_(tensor, step.direction, alpha * step.group["scale"])


def add_error(grad: torch.Tensor, state: dict, group: Mapping[str, Any]) -> torch.Tensor:
    """``G + E`` with the stored error ``E`` taken out of ``state`` (``G`` when there is none).

    Called by a method's ``prepare_gradient`` once the step is certain to run; the update rule
    (:class:`ErrorFeedback`) writes the new error.
    """
    error = state.pop(ERROR_KEY, None)
    return grad if error is None else grad + error


class ErrorFeedback(DropResidual):
    """GaLore's update ``scale * L direction R^T``; with the group key ``error_feedback`` the
    dropped part of the (error-corrected) gradient, ``G - L L^T G R R^T``, is added to
    ``state["error"]`` for the next step (which may already hold what a moment switch lost)."""

    def combine(self, step: LowRankStep) -> torch.Tensor:
        self.record_error(step)
        return super().combine(step)

    def apply(self, step: LowRankStep, tensor: torch.Tensor, alpha: float) -> None:
        self.record_error(step)
        super().apply(step, tensor, alpha)

    @staticmethod
    def record_error(step: LowRankStep) -> None:
        if step.group["error_feedback"]:
            dropped = step.grad - step.project_back(step.low_grad)
            state = step.state
            state[ERROR_KEY] = state[ERROR_KEY].add_(dropped) if ERROR_KEY in state else dropped


def limit_norm_growth(update: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    """Fira's limiter, in place: ``||U_t|| <= GROWTH_LIMIT * ||U_{t-1}||``; returns ``update``.

    ``state[key]`` holds the previous (limited) norm as a 0-d tensor in at least float32 (the
    update's dtype when wider); the first call only records it. No host synchronisation.
    """
    norm = torch.linalg.vector_norm(update, dtype=torch.promote_types(update.dtype, torch.float32))
    if key not in state:
        state[key] = norm
        return update
    limiter = torch.clamp(norm / (state[key] + NORM_GUARD), min=GROWTH_LIMIT) / GROWTH_LIMIT
    state[key] = norm / limiter
    return update.div_(limiter)
