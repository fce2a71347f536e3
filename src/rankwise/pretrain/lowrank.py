"""Low-rank pretraining from scratch: ``W = B A`` with both factors trainable.

The "Low-Rank" baseline of Zhao et al., "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", arXiv 2403.03507 (the "Low-Rank" row of its C4 pretraining
table: the weight is factorised as ``W = BA`` and trained from scratch; it lags full-rank
training markedly, which is GaLore's motivation). Each targeted ``out x in`` (``m x n``) Linear becomes a
:class:`~rankwise.nn.FactorizedLinear`

    y = B (A x) + b,   A = down.weight (r x n),  B = up.weight (m x r),

with ``r (m + n)`` trainable weights instead of ``m n`` (the bias is kept as initialised).

Initialisation (our choice; the paper does not specify one). Let ``sigma^2`` be the mean
square of the dense layer's fresh init (so it follows whatever init the model uses:
``N(0, 0.02^2)`` for LLaMA, Kaiming-uniform for plain ``nn.Linear``). Draw

    A_ij ~ N(0, a^2),  B_ij ~ N(0, b^2),
    a^2 = sigma sqrt(m / (n r)),  b^2 = sigma sqrt(n / (m r)),

so every entry of the product has variance ``r a^2 b^2 = sigma^2`` -- the dense init's --
and the two factors are balanced, ``E||A||_F^2 = E||B||_F^2 = sigma sqrt(m n r)`` (the
Gaussian analogue of splitting singular values evenly). Neither factor is zero, so both get
gradients from the first step. Option ``seed`` (default None = torch's global RNG, as model
init) makes the draw reproducible on its own.

Options ``refactor_every`` and ``momentum_reset_every`` add the weight refactorisation and
momentum reset of arXiv 2505.22922 (:mod:`rankwise.pretrain.refactor`); both off by default.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.nn import FactorizedLinear
from rankwise.options import Option
from rankwise.pretrain.core import PARAMETRISATIONS, DenseLayer
from rankwise.pretrain.refactor import REFACTOR_OPTIONS, RefactorHooks


@PARAMETRISATIONS.register(
    "lowrank",
    family="lowrank",
    paper="GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (the Low-Rank baseline)",
    arxiv="2403.03507",
)
class LowRank(RefactorHooks):
    """``W = B A``, balanced Gaussian factors whose product matches the dense init's variance."""

    OPTIONS = {
        "seed": Option(None, int, nullable=True,
                       help="seed of the factors' draw; None = torch's global RNG, as the model's init"),
        **REFACTOR_OPTIONS,
    }

    def __init__(self, rank: int, **options: Any) -> None:
        super().__init__(rank, **options)
        seed = self.options["seed"]
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def layer_types(self) -> tuple[type, ...]:
        return (FactorizedLinear,)

    def factor_pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        return [(layer.up.weight, layer.down.weight, [p for p in layer.parameters() if p.requires_grad])
                for layer in self.layers(model).values()]

    def build(self, layer: DenseLayer) -> FactorizedLinear:
        weight = layer.weight
        m, n, r = layer.out_features, layer.in_features, self.rank
        sigma = layer.init_std()
        std_down = math.sqrt(sigma * math.sqrt(m / (n * r)))
        std_up = math.sqrt(sigma * math.sqrt(n / (m * r)))
        # Drawn on the CPU in float32 so a seed gives the same factors on every device/dtype.
        down = torch.randn(r, n, generator=self.generator) * std_down
        up = torch.randn(m, r, generator=self.generator) * std_up
        bias = None if layer.bias is None else layer.bias.detach()
        module = FactorizedLinear.from_factors(up.to(weight.dtype), down.to(weight.dtype), bias)
        return module.to(device=weight.device, dtype=weight.dtype)
