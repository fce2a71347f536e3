"""``lora_ggpo``: LoRA trained under gradient-guided random weight perturbations.

Paper: Chang, Guo, Chang & Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
Gradient-Guided Perturbation Optimization", arXiv 2502.14538 **v1** (v2/v3 of the same arXiv id
are a different method, LoRA-MGPO).

Formula implemented
-------------------
The layer is LoRA (``W' = W + s B A``, ``A`` kaiming-uniform, ``B = 0``; see
:class:`rankwise.adapters.lora_family.StandardLoraLayer`). Training minimises the expected loss under a random perturbation
of the merged weight (the Flat-LoRA objective the paper builds on)::

    min_{A,B}  E_{eps ~ N(0, Sigma)}  L(W + s B A + eps)

with one sample of ``eps`` (``out x in``) drawn at every training forward, rows independent::

    Sigma = (sigma^2 / n) * diag( ||W'_{i,:}||^2 + beta * ||grad W'_{i,:}||^2 )_{i=1..out}
    eps_{i,j} ~ N(0, (sigma^2 / n) * (||W'_{i,:}||^2 + beta * ||grad W'_{i,:}||^2)),   n = in_features

so rows of the weight that are large, or whose gradient is large, are perturbed more. The layer
computes ``base(x) + s B A dropout(x) + x eps^T`` in training mode; in eval mode, merged, saved
or exported it is exactly LoRA (no perturbation), so the output equals the base at init.

``grad W'`` is the gradient of the loss with respect to the merged weight. It is obtained
without any extra pass: ``eps`` enters the output as an additive weight, so the gradient that
backpropagation sends to ``eps`` is exactly ``dL/dW'`` (at the perturbed point). A hook
accumulates it (over gradient-accumulation micro-batches) and the method's ``after_step`` stores
its squared row norms and frees it; the next step's perturbations use them. The training loop
must call ``rankwise.adapters.after_step(model, ...)`` once after each ``optimizer.step()`` (the
bench and CLI install it through ``rankwise.training.TrainingHooks``). Until the first ``after_step``
(and forever without it) the gradient term is zero.

Defaults ``sigma = 0.03``, ``beta = 0.01``.

Provenance and deviations
-------------------------
- The paper's method section could not be read directly (only its abstract); the covariance
  above is taken from two mutually consistent secondary sources: a summary of v1
  (themoonlight.io review: the objective ``E_{eps~N(0, sigma^2 I)} L(W + AB + eps)`` and the
  covariance ``Sigma = sigma^2/n diag(||W'_1 ...``) and an independent implementation citing
  v1's Eqs. 6-8 (per-row variance ``sigma^2/n (||W_i||^2 + beta ||G_i||^2)``, ``n`` the input
  dimension). The defaults are the values these implementations attribute to the paper.
- The paper does not say (in what could be read) how ``grad W'`` is obtained under LoRA; this
  module uses the exact full-weight gradient of the previous optimizer step (the current one is
  unknown before the forward pass). Holding it costs one ``out x in`` fp32 tensor per layer
  between backward and ``after_step``.
- ``eps`` is added to ``x`` (not ``dropout(x)``): it perturbs the whole merged weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.lora_family import StandardLoraLayer
from rankwise.errors import RankwiseError
from rankwise.options import Option


@ADAPTERS.register(
    "lora_ggpo",
    family="training_time",
    paper="LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation Optimization",
    arxiv="2502.14538",
    supports=LINEAR_LIKE,
)
class LoraGgpoLayer(StandardLoraLayer):
    """LoRA whose training forward adds ``x eps^T``, ``eps`` row-wise Gaussian with variance
    ``sigma^2/n (||W'_i||^2 + beta ||grad W'_i||^2)``; identical to LoRA in eval mode."""

    OPTIONS = {
        "sigma": Option(0.03, float, low=0, help="overall perturbation scale sigma (0 = plain LoRA training)"),
        "beta": Option(0.01, float, low=0, help="weight beta of the gradient row norms in the variance"),
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        # ||grad W'_{i,:}||^2 of the last completed step; training state, not saved with the adapter
        self.register_buffer(
            "gradient_row_norms_sq",
            torch.zeros(self.out_features, device=self.factory["device"], dtype=torch.float32),
            persistent=False,
        )
        self._weight_gradient: torch.Tensor | None = None

    def perturbation_std(self) -> torch.Tensor:
        """Per-row standard deviation ``sqrt(sigma^2/n (||W'_i||^2 + beta ||grad W'_i||^2))`` (fp32, ``out``)."""
        with torch.no_grad():
            merged = self.base_weight() + self.delta_weight().float()
            variance = merged.square().sum(dim=1) + self.options["beta"] * self.gradient_row_norms_sq
            return (self.options["sigma"] ** 2 / self.in_features * variance).sqrt()

    def _accumulate_weight_gradient(self, gradient: torch.Tensor) -> None:
        gradient = gradient.detach().float()
        self._weight_gradient = gradient if self._weight_gradient is None else self._weight_gradient + gradient

    def contribution(self, x: torch.Tensor) -> torch.Tensor | None:
        out = super().contribution(x)
        if not self.training or self.merged or not self.enabled:
            return out
        noise = torch.randn(self.out_features, self.in_features, device=x.device, dtype=torch.float32)
        perturbation = (noise * self.perturbation_std()[:, None]).to(out.dtype)
        if torch.is_grad_enabled():
            # the gradient reaching this additive weight is dL/dW' (see the module docstring)
            perturbation.requires_grad_(True)
            perturbation.register_hook(self._accumulate_weight_gradient)
        return out + F.linear(x.to(out.dtype), perturbation)

    @classmethod
    def after_step(
        cls, layers: dict[str, LoraGgpoLayer], *, step: int, total_steps: int, optimizer: Any = None
    ) -> None:
        """Store ``||grad W'_{i,:}||^2`` of the step just taken for the next perturbations."""
        if not any(layer._weight_gradient is not None for layer in layers.values()):
            raise RankwiseError(
                "lora_ggpo's after_step needs a backward pass in train mode since the last step, but no "
                "adapter saw one: call rankwise.adapters.after_step once after each optimizer.step()"
            )
        for layer in layers.values():
            if layer._weight_gradient is not None:
                layer.gradient_row_norms_sq.copy_(layer._weight_gradient.square().sum(dim=1))
                layer._weight_gradient = None
