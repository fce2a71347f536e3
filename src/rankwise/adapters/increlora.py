"""IncreLoRA: ranks are added during training to the most important layers.

Zhang et al. 2023, "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning", arXiv 2308.12043.

The update has AdaLoRA's SVD-like form (shared :class:`~rankwise.adapters.svd_triplet_family.SvdTripletLayer`),
a sum of rank-one components of which only the allocated ones count:

    W = W0 + (alpha / r_k) * sum_{i active} lambda_i P_i Q_i  (+ advance-learning reserves, below)

with ``r_k`` the layer's current (active) rank (the scaling of the authors' release, so the
output of the existing components is rescaled when a layer grows), ``lambda = 0`` at init, and the orthogonality
regulariser ``gamma (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2)`` over the components in use
(``regularization()``). Each layer starts with ``init_r`` active components.

Importance of a layer (module), from the gradient of its whole update ``dW`` (the update is
materialised in the training forward while the budget is not reached, so ``dL/d(dW)`` is seen):

    I_t = sum_{ij} |dW_ij * dL/d dW_ij| / sqrt(out * in)      (normalisation of the authors' release)
    Ibar_t = beta1 Ibar_{t-1} + (1-beta1) I_t;  Ubar_t = beta2 Ubar_{t-1} + (1-beta2) |I_t - Ibar_t|
    S_t = Ibar_t * Ubar_t

Allocation (``after_step``): at every step ``t > init_warmup`` with ``t % incre_interval == 0``,
while the total rank is below the budget ``b = target_r * n`` (``n`` adapted layers), the
``top_h`` layers with the highest ``S`` each gain ``incre_rank`` components (the last one fewer if
that would pass ``b``). Once the budget is reached, allocation and importance tracking stop.

Advance learning (``advance_learning=True``): every layer keeps ``incre_rank`` reserve components
whose ``P_i``, ``Q_i`` train ahead of time while their ``lambda_i`` is held at 1e-5 (so they get a
gradient but barely change the output). When a layer gains rank its reserves become active with
``lambda_i = 1e-5`` (now trainable) and the next components become the reserve. With
``advance_learning=False`` reserves have ``lambda = 0`` and do not train before activation.
When the budget is reached the reserves are dropped.

Deviation (documented): the paper grows the tensors and adds new parameter groups to the
optimizer. Here ``rank`` is a pre-allocated capacity per layer and the state lives in the
persistent boolean buffers ``active`` / ``reserve`` (saved with the adapter), so the optimizer's
parameters never change. Consequences: a layer cannot grow past ``rank`` (it is skipped when
full); the trainable-parameter count reported by torch is the capacity ``rank * (in + out + 1)``
(``effective_rank()`` gives the allocated rank); components not yet in use get no gradient
but an AdamW weight decay would still shrink them; and the paper's "restart warmup" (a fresh
learning-rate warm-up for newly added parameters) is not applied -- newly activated entries
share the optimizer's step count and schedule. ``P``, ``Q`` are drawn with standard deviation
``1/sqrt(out)``, ``1/sqrt(in)`` as in rankwise's AdaLoRA.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.hooks import refuse_merged
from rankwise.adapters.svd_triplet_family import SMOOTHING, SvdTripletLayer, update_smoothed_importance
from rankwise.errors import RankwiseError
from rankwise.options import Option

# lambda of the reserve components under advance learning: non-zero so P_i, Q_i get a gradient.
RESERVE_VALUE = 1e-5


@ADAPTERS.register(
    "increlora",
    family="dynamic_rank",
    paper="IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
    arxiv="2308.12043",
    supports=LINEAR_LIKE,
)
class IncreLoraLayer(SvdTripletLayer):
    """SVD-form update whose rank grows, by importance, up to the capacity ``rank``."""

    OPTIONS = {
        "init_r": Option(1, int, low=1, help="active components per layer at the start (at most rank)"),
        "target_r": Option(
            None, int, low=1, nullable=True,
            help="average rank per layer the budget grows to (in [init_r, rank]); None = max(init_r, rank // 2)",
        ),
        "incre_rank": Option(None, int, low=1, nullable=True,
                             help="components a selected layer gains (at most rank); None = max(1, target_r // 2)"),
        "top_h": Option(
            None, int, low=1, nullable=True, help="layers that grow per allocation; None = a quarter of the layers"
        ),
        "init_warmup": Option(0, int, low=0, help="steps before the first allocation"),
        "incre_interval": Option(10, int, low=1, help="steps between allocations"),
        "beta1": SMOOTHING,
        "beta2": SMOOTHING,
        "advance_learning": Option(True, bool, help="train the next components ahead of their activation"),
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        if self.options["target_r"] is None:
            self.options["target_r"] = max(self.options["init_r"], self.rank // 2)
        if self.options["incre_rank"] is None:
            # The authors' release adds target_r / 2 components per selected layer.
            self.options["incre_rank"] = max(1, self.options["target_r"] // 2)
        for name, low in (("init_r", 1), ("target_r", self.options["init_r"]), ("incre_rank", 1)):
            if not low <= self.options[name] <= self.rank:
                raise self.error(f"{name} must be in [{low}, rank={self.rank}], got {self.options[name]}")
        init_r, incre_rank = self.options["init_r"], self.options["incre_rank"]
        if self.options["target_r"] > init_r and init_r + incre_rank > self.rank:
            raise self.error(
                f"rank {self.rank} (the capacity) leaves no room to grow from init_r={init_r} by "
                f"incre_rank={incre_rank}; raise rank or lower init_r / incre_rank"
            )
        device = self.factory["device"]
        self.register_buffer("active", torch.zeros(self.rank, dtype=torch.bool, device=device))
        self.register_buffer("reserve", torch.zeros(self.rank, dtype=torch.bool, device=device))
        fp32 = {"device": device, "dtype": torch.float32}
        self.register_buffer("current_importance", torch.zeros((), **fp32), persistent=False)
        self.register_buffer("importance_avg", torch.zeros((), **fp32), persistent=False)
        self.register_buffer("importance_unc", torch.zeros((), **fp32), persistent=False)
        self.tracking_importance = True
        self.importance_seen = False

    def initialize(self, stats: Any = None) -> None:
        super().initialize(stats)
        with torch.no_grad():
            self.active.zero_()
            self.active[: self.options["init_r"]] = True
            self.reserve.zero_()
            self._refill_reserve()

    def _refill_reserve(self) -> None:
        """The next ``incre_rank`` unused components become the reserve (if they fit)."""
        start = int(self.active.sum())
        end = start + int(self.options["incre_rank"])
        if end <= self.rank:
            self.reserve[start:end] = True

    def can_grow(self) -> bool:
        return bool(self.reserve.any())

    def grow(self, count: int) -> int:
        """Activate up to ``count`` reserve components (lambda starts at the reserve value); returns how many."""
        with torch.no_grad():
            indices = torch.nonzero(self.reserve).flatten()[:count]
            value = RESERVE_VALUE if self.options["advance_learning"] else 0.0
            self.lora_lambda[indices] = value
            self.active[indices] = True
            self.reserve.zero_()
            self._refill_reserve()
        return int(indices.numel())

    def drop_reserve(self) -> None:
        self.reserve.zero_()

    def current_scaling(self) -> torch.Tensor:
        """``alpha / r_k`` with ``r_k`` the number of active components."""
        return self.alpha / self.active.sum().clamp(min=1).to(self.lora_lambda.dtype)

    def effective_singular_values(self) -> torch.Tensor:
        reserve_value = RESERVE_VALUE if self.options["advance_learning"] else 0.0
        values = torch.where(self.active, self.lora_lambda, torch.zeros_like(self.lora_lambda))
        values = values + self.reserve.to(values.dtype) * reserve_value
        return values * self.current_scaling()

    def regularized_rows(self) -> torch.Tensor:
        return self.active | self.reserve

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.tracking_importance and torch.is_grad_enabled()):
            return super().adapter_forward(x)
        delta = self.delta_weight()
        if delta.requires_grad:
            delta.register_hook(lambda grad, update=delta.detach(): self._record_importance(update, grad))
        return x.to(delta.dtype) @ delta.T

    def _record_importance(self, update: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            value = (update.float() * grad.float()).abs().sum() / math.sqrt(update.numel())
            self.current_importance.copy_(value)
        self.importance_seen = True

    def update_importance(self) -> None:
        if not self.importance_seen:  # the loss did not reach this layer this step: sensitivity 0
            self.current_importance.zero_()
        beta1, beta2 = float(self.options["beta1"]), float(self.options["beta2"])
        update_smoothed_importance(self.importance_avg, self.importance_unc, self.current_importance, beta1, beta2)
        self.importance_seen = False

    def score(self) -> float:
        return float(self.importance_avg * self.importance_unc)

    @classmethod
    def after_step(
        cls, layers: dict[str, IncreLoraLayer], *, step: int, total_steps: int, optimizer: Any = None
    ) -> None:
        first = next(iter(layers.values()))
        budget = sum(int(layer.options["target_r"]) for layer in layers.values())
        total = sum(layer.allocated_rank() for layer in layers.values())
        refuse_merged(layers, "increlora")
        if total >= budget:
            cls._finish(layers)
            return
        if not any(layer.importance_seen for layer in layers.values()):
            raise RankwiseError(
                "increlora's after_step needs a backward pass in train mode since the last step, but no adapter "
                "saw one: call rankwise.adapters.after_step once after each optimizer.step()"
            )
        for layer in layers.values():
            layer.update_importance()
        init_warmup, interval = int(first.options["init_warmup"]), int(first.options["incre_interval"])
        if step <= init_warmup or step % interval:
            return
        top_h = first.options["top_h"] or max(1, math.ceil(len(layers) / 4))
        candidates = sorted((layer for layer in layers.values() if layer.can_grow()), key=lambda l: -l.score())
        for layer in candidates[:top_h]:
            if total >= budget:
                break
            total += layer.grow(min(int(layer.options["incre_rank"]), budget - total))
        if total >= budget:
            cls._finish(layers)

    @staticmethod
    def _finish(layers: dict[str, IncreLoraLayer]) -> None:
        for layer in layers.values():
            layer.drop_reserve()
            layer.tracking_importance = False

    def allocated_rank(self) -> int:
        """Allocated (active) components: the paper's rank of this layer."""
        return int(self.active.sum())
