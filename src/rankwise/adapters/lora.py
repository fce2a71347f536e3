"""LoRA and rsLoRA.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
rsLoRA: Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
arXiv 2312.03732.

The frozen weight ``W`` (``out x in``) is adapted as

    h = W x + s * B A x,     A in R^{r x in},  B in R^{out x r}
    s = alpha / r            (LoRA)
    s = alpha / sqrt(r)      (rsLoRA, ``rslora=True``: keeps the update's scale stable as r grows)

so ``delta_weight() = s * B @ A``. Initialisation: ``A`` kaiming-uniform with ``a = sqrt(5)``
(``U(-1/sqrt(in), 1/sqrt(in))``, nn.Linear's default -- the paper only asks for a random
Gaussian ``A``; this follows the common implementation choice) and ``B = 0``, so the
adapted model equals the base model at init. ``dropout`` is applied to the input of the
adapter path only (as in the paper's code release); the base path never sees it.

Tensors are named ``lora_A`` (r x in) and ``lora_B`` (out x r): the layouts of PEFT's
``lora_A.weight`` / ``lora_B.weight``, so an export only appends ``.weight`` to the key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, AdapterLayer, LoraParameters


@ADAPTERS.register(
    "lora",
    family="lora",
    paper="LoRA: Low-Rank Adaptation of Large Language Models",
    arxiv="2106.09685",
)
class LoraLayer(AdapterLayer):
    """``base(x) + s * B A dropout(x)`` with ``s = alpha/r`` (or ``alpha/sqrt(r)`` with rsLoRA)."""

    OPTIONS = {"rslora": False}
    #: parameters on the output side of the update (LoRA's ``B``); LoRA+ gives them their own
    #: learning rate and LoRA-Pro pairs them with ``lora_A`` (see rankwise.optim.loraplus / lora_pro)
    output_factor_names = ("lora_B",)

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        if not isinstance(self.options["rslora"], bool):
            raise self.error(f"rslora must be True or False, got {self.options['rslora']!r}")
        self.scaling = self.alpha / (math.sqrt(self.rank) if self.options["rslora"] else self.rank)
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def lora_parameters(self) -> LoraParameters:
        return LoraParameters(self.lora_A, self.lora_B, self.scaling)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s * B, A)`` in fp32: the update is exactly rank-r factored."""
        return self.scaling * self.lora_B.detach().float(), self.lora_A.detach().float()

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin products (tokens x r) instead of materialising the out x in update.
        return (x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T * self.scaling
