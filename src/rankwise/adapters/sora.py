"""SoRA: a gated LoRA whose gate is made sparse by proximal gradient steps.

Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models", EMNLP 2023,
arXiv 2311.11696.

The update of an ``out x in`` weight is LoRA with a gate ``g in R^{r_max}`` between the factors:

    h = W0 x + s * B (g (.) (A x)),   i.e.  delta = s * B diag(g) A,   s = alpha / r_max

``A`` is kaiming-uniform and ``B = 0`` at init (the model equals the base model); ``g`` is drawn
from a standard Gaussian, as in the authors' release. ``A``, ``B`` and ``g`` all take the
optimizer's step; after every step ``after_step`` applies the proximal operator of the L1
penalty ``lambda ||g||_1`` (paper eq. for the gate update):

    g <- T_{eta_t * lambda}(g),    T_xi(x) = sign(x) * max(|x| - xi, 0)

with ``eta_t`` the current learning rate of the optimizer group holding ``g`` and ``lambda`` the
option ``sparse_lambda``. Gates that reach exactly 0 prune their rank: ``effective_rank()``
counts the non-zero gates, and :meth:`SoraLayer.lora_factors` drops the pruned ranks.
The factors ``A``, ``B`` and their scaling are the LoRA family's
(:class:`~rankwise.adapters.lora_family.LoraFactorsLayer`).

Deviations:

- the paper writes the gate update as a proximal *SGD* step, ``T_{eta_t lambda}(g - eta_t
  grad)``; here the gradient part is whatever optimizer trains the adapter (the authors'
  release also uses AdamW for it), followed by the paper's thresholding;
- threshold scaling: rankwise thresholds by ``eta_t * lambda``, the paper's proximal step, so
  the threshold follows the learning-rate schedule. The authors' release (its ``SparseAdamW``)
  instead thresholds by a constant ``xi`` (``sparse_lambda_2``, 1e-3 by default, 3e-4 in its
  scripts) whatever the learning rate, and also adds ``sparse_lambda * mean |g|`` to the loss.
  Its lr-scaled variant (``sparse_optimizer_multiply_lr.py``) is the paper's rule and this
  module's. To reproduce a constant threshold ``xi`` under a constant learning rate ``eta``,
  pass ``sparse_lambda = xi / eta``. (The release applies its threshold as three masked
  assignments, which also zeroes gates in ``(xi, 2 xi)``; rankwise applies the exact
  soft-threshold operator.)
- the paper's optional sparsifying scheduler (raising ``lambda`` over training to trace a
  sparsity/accuracy path, its Algorithm 1) is not included: change ``sparse_lambda`` between runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.hooks import refuse_merged
from rankwise.adapters.lora_family import LoraFactorsLayer
from rankwise.errors import RankwiseError
from rankwise.options import Option


def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """``sign(x) * max(|x| - threshold, 0)``: the proximal operator of ``threshold * |x|``."""
    return torch.sign(values) * torch.clamp(values.abs() - threshold, min=0.0)


def _gate_learning_rates(optimizer: Any, layers: dict[str, SoraLayer]) -> dict[str, float]:
    """``eta_t`` of each layer's gate: the current ``lr`` of the optimizer group holding it."""
    rate_of = {id(p): float(group["lr"]) for group in getattr(optimizer, "param_groups", []) for p in group["params"]}
    missing = [name for name, layer in layers.items() if id(layer.gate) not in rate_of]
    if missing:
        raise RankwiseError(
            f"sora's after_step needs the optimizer that trains the gates (its learning rate is the proximal "
            f"step size eta_t), but the gate of {missing[0]!r} is not in it; pass optimizer=... holding the "
            "adapter parameters"
        )
    return {name: rate_of[id(layer.gate)] for name, layer in layers.items()}


@ADAPTERS.register(
    "sora",
    family="dynamic_rank",
    paper="Sparse Low-rank Adaptation of Pre-trained Language Models",
    arxiv="2311.11696",
    supports=LINEAR_LIKE,
)
class SoraLayer(LoraFactorsLayer):
    """``base(x) + s * B (g * (A x))`` with the gate ``g`` sparsified by soft-thresholding."""

    OPTIONS = {"sparse_lambda": Option(0.1, float, low=0, help="L1 strength lambda; threshold per step = lr * lambda")}

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.gate = nn.Parameter(torch.empty(self.rank, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        self.reset_lora_factors()
        with torch.no_grad():
            nn.init.normal_(self.gate)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B * self.gate) @ self.lora_A

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.lora_A.dtype) @ self.lora_A.T) * (self.gate * self.scaling)) @ self.lora_B.T

    def proximal_step(self, threshold: float) -> None:
        with torch.no_grad():
            self.gate.copy_(soft_threshold(self.gate, threshold))

    def effective_rank(self) -> int:
        """Number of ranks whose gate is not 0."""
        return int(torch.count_nonzero(self.gate))

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in fp32 with ``B @ A == delta_weight()``; ranks with gate 0 dropped."""
        with torch.no_grad():
            keep = self.gate != 0
            up = self.lora_B.float()[:, keep] * (self.gate.float()[keep] * self.scaling)
            return up.contiguous(), self.lora_A.float()[keep].contiguous()

    @classmethod
    def after_step(cls, layers: dict[str, SoraLayer], *, step: int, total_steps: int, optimizer: Any = None) -> None:
        refuse_merged(layers, "sora")
        rates = _gate_learning_rates(optimizer, layers)
        for name, layer in layers.items():
            layer.proximal_step(rates[name] * layer.options["sparse_lambda"])
