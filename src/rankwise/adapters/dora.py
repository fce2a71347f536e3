"""DoRA: weight-decomposed low-rank adaptation.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353.

The weight is split into a magnitude and a direction; the direction is adapted by LoRA and the
magnitude is trained directly::

    W' = m * (W + s B A) / ||W + s B A||_c          m in R^out,  A in R^{r x in},  B in R^{out x r}

``||.||_c`` is the norm of each output row of the ``out x in`` matrix (the paper's column norm of
its ``d x k`` convention, PEFT's ``norm(weight, dim=1)``); ``s = alpha / r`` (``alpha / sqrt(r)``
with ``rslora``). Init: LoRA's (``A`` kaiming-uniform, ``B = 0``) and ``m = ||W||_c``, so the model
starts as the base. Trainable parameters per layer: ``r (in + out) + out``.

Unmerged forward, with ``g = m / ||W + s B A||_c`` per output feature::

    base(x) + (g - 1) * (x W^T) + g * s * B A x

The norm is treated as a constant in the backward pass (paper section 4.3: it still reflects
``B A`` but receives no gradient, which saves the memory of its graph), as PEFT does. Merging
writes ``W'``; unmerging needs the norm of ``W + s B A`` at merge time (``W'`` has row norms ``m``
and forgets it), which the layer keeps while merged.

Deviations: none in the update; ``dropout`` acts on the adapter path's input (both terms above),
as PEFT's DoRA in training mode. PEFT has DoRA (``LoraConfig(use_dora=True)``): the export
writes that format (``lora_A``, ``lora_B``, ``lora_magnitude_vector``) for ``nn.Linear`` layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, PeftNative
from rankwise.adapters.lora_family import RSLORA, LoraFactorsLayer


@ADAPTERS.register(
    "dora",
    family="weight_decomposed",
    paper="DoRA: Weight-Decomposed Low-Rank Adaptation",
    arxiv="2402.09353",
    supports=LINEAR_LIKE,
)
class DoraLayer(LoraFactorsLayer):
    """``m * (W + s B A) / ||W + s B A||_c`` with ``m``, ``A``, ``B`` trainable."""

    OPTIONS = {"rslora": RSLORA}

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **self.factory))
        #: ``||W + s B A||_c`` when merged (W' forgets it); None otherwise
        self.merged_norm: torch.Tensor | None = None

    def lora_scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.options["rslora"] else self.rank)

    def initialize(self, stats: Any = None) -> None:
        self.reset_lora_factors()
        with torch.no_grad():
            self.lora_magnitude.copy_(torch.linalg.vector_norm(self.base_weight(), dim=1))

    def lora_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def original_direction(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, W + s B A)`` in ``dtype``; while merged ``W`` is recovered from ``W' = g (W + s B A)``."""
        lora = self.lora_weight().to(dtype)
        weight = self.base_weight(dtype)
        if self.merged:
            weight = weight * (self.merged_norm.to(dtype) / self.lora_magnitude.to(dtype))[:, None] - lora
        return weight, weight + lora

    def delta_weight(self) -> torch.Tensor:
        dtype = self.lora_A.dtype
        weight, directed = self.original_direction(dtype)
        norm = torch.linalg.vector_norm(directed, dim=1).detach()
        return (self.lora_magnitude / norm)[:, None] * directed - weight

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_A.dtype
        weight, directed = self.original_direction(dtype)
        gain = self.lora_magnitude / torch.linalg.vector_norm(directed, dim=1).detach()
        lora = self.project_out(self.project_in(x, self.lora_A), self.lora_B) * self.scaling
        return (gain - 1) * self.project_in(x, weight) + gain * lora

    def merge(self, *, allow_lossy: bool = False) -> None:
        if not self.merged:
            with torch.no_grad():
                _, directed = self.original_direction(torch.float32)
                norm = torch.linalg.vector_norm(directed, dim=1)
            super().merge(allow_lossy=allow_lossy)
            self.merged_norm = norm

    def unmerge(self, *, allow_lossy: bool = False) -> None:
        super().unmerge(allow_lossy=allow_lossy)
        if not self.merged:
            self.merged_norm = None

    def peft_native(self) -> PeftNative | None:
        if self.kind != "linear":
            return None
        config = {"r": self.rank, "lora_alpha": self.alpha, "use_dora": True, "use_rslora": self.options["rslora"],
                  "lora_dropout": float(self.options["dropout"]), "fan_in_fan_out": False, "bias": "none",
                  "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
                  "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
                  "lora_bias": False, "layer_replication": None}
        return PeftNative("LORA", config, {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B,
                                           "lora_magnitude_vector": self.lora_magnitude})
