"""What the LoRA-shaped methods share: the two factors ``A``, ``B`` and their scaling, written once.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685;
rsLoRA: Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
arXiv 2312.03732.

- :class:`LoraFactorsLayer` allocates ``lora_A`` (r x in) and ``lora_B`` (out x r) -- PEFT's
  ``lora_A.weight`` / ``lora_B.weight`` layouts, so an export only appends ``.weight`` -- and
  the scaling ``s = alpha / r``; it offers LoRA's init (``A`` kaiming-uniform with
  ``a = sqrt(5)``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``, nn.Linear's default, and ``B = 0``).
  Methods that put something between the factors (SoRA's gate) or use leading blocks of them
  (DyLoRA) build on it.
- :class:`LoraShapedLayer`: the update is exactly ``s B A`` with both factors trained --
  ``delta_weight``, the two-thin-products forward, :meth:`lora_parameters` (LoRA+, LoRA-Pro,
  PEFT export) and :meth:`lora_factors` follow. The LoRA-shaped base rewrites (PiSSA, OLoRA,
  CorDA, LoRA-GA; :class:`~rankwise.adapters.rewrite.LoraRewriteLayer`) build on it.
- :class:`StandardLoraLayer`: LoRA itself, ``h = W x + s B A dropout(x)`` with LoRA's init
  (the model equals the base at init) and the ``rslora`` option (``s = alpha / sqrt(r)``: the
  update's scale stays stable as r grows); the methods that keep LoRA's layer and change
  its init (EVA) or its training (LoRA-Pro, LoRA-GGPO) build on it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import AdapterLayer, LoraParameters
from rankwise.options import Option

RSLORA = Option(False, bool, help="rsLoRA scaling alpha / sqrt(r) instead of alpha / r")


class LoraFactorsLayer(AdapterLayer):
    """Allocates ``lora_A`` (r x in), ``lora_B`` (out x r) and ``self.scaling`` (:meth:`lora_scaling`)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.lora_scaling()
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))

    def lora_scaling(self) -> float:
        """``s = alpha / r``."""
        return self.alpha / self.rank

    def reset_lora_factors(self) -> None:
        """LoRA's init: ``A`` kaiming-uniform (``a = sqrt 5``), ``B = 0`` (so ``B A = 0``); on an
        embedding ``A = 0`` and ``B`` standard normal, as the paper's code (loralib) and PEFT."""
        with torch.no_grad():
            if self.kind == "embedding":
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)


class LoraShapedLayer(LoraFactorsLayer):
    """An update of exactly ``s * lora_B @ lora_A`` with both factors trainable."""

    #: read by rankwise.optim.loraplus / lora_pro until they use lora_parameters(); delete then
    output_factor_names = ("lora_B",)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two thin products (tokens x r) instead of materialising the out x in update; on Conv2d
        # a k x k convolution down to r channels, then a 1 x 1 convolution up (PEFT's layout).
        return self.project_out(self.project_in(x, self.lora_A), self.lora_B) * self.scaling

    def lora_parameters(self) -> LoraParameters:
        return LoraParameters(self.lora_A, self.lora_B, self.scaling)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s * B, A)`` in fp32: the update is exactly rank-r factored."""
        return self.scaling * self.lora_B.detach().float(), self.lora_A.detach().float()


class StandardLoraLayer(LoraShapedLayer):
    """LoRA: ``base(x) + s B A dropout(x)``, ``A`` kaiming-uniform, ``B = 0``, ``s = alpha/r`` or ``alpha/sqrt(r)``."""

    OPTIONS = {"rslora": RSLORA}

    def lora_scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.options["rslora"] else self.rank)

    def lora_parameters(self) -> LoraParameters:
        return LoraParameters(self.lora_A, self.lora_B, self.scaling, rslora=self.options["rslora"])

    def initialize(self, stats: Any = None) -> None:
        self.reset_lora_factors()
