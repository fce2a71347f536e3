"""LoHa: the update as the Hadamard product of two low-rank matrices.

Hyeon-Woo et al. 2021, "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated
Learning", arXiv 2108.06098; as an adapter in LyCORIS: Yeh et al. 2023, "Navigating
Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", arXiv 2309.14859.

    dW = s * (W1a W1b) o (W2a W2b)      W1a, W2a in R^{out x r},  W1b, W2b in R^{r x in},  s = alpha / r

(``o`` the entrywise product). Two rank-``r`` factors give a product of rank up to ``r^2`` for
``2 r (in + out)`` parameters. Init as PEFT / FedPara: ``W1a``, ``W1b``, ``W2a`` kaiming-uniform
(``a = sqrt 5``), ``W2b = 0``, so the update is zero at init.

The product has the exact rank-``r^2`` factors ``dW = s U V`` with ``U[o, (p, q)] = W1a[o, p] W2a[o, q]``
(row-wise Kronecker product) and ``V[(p, q), i] = W1b[p, i] W2b[q, i]`` (column-wise), so
``adapter_forward`` applies ``V`` then ``U`` when that is cheaper than forming the ``out x in``
update, and ``lora_factors`` gives them for an exact LoRA export.

Deviations from PEFT's LoHa: its ``rank_dropout`` / ``module_dropout`` are not offered (``dropout``
acts on the adapter path's input; PEFT has no such dropout, outputs agree in eval mode); Linear-like
layers only (no Conv2d / CP-decomposed kernels). Export: PEFT's LoHa format (``hada_w1_a`` ...)
for ``nn.Linear`` layers, otherwise the exact rank-``r^2`` LoRA.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer, PeftNative


@ADAPTERS.register(
    "loha",
    family="hadamard",
    paper="FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning",
    arxiv="2108.06098",
    supports=LINEAR_LIKE,
)
class LohaLayer(AdapterLayer):
    """``s (W1a W1b) o (W2a W2b)`` with all four factors trainable."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        for name, shape in (("hada_w1_a", (self.out_features, self.rank)), ("hada_w1_b", (self.rank, self.in_features)),
                            ("hada_w2_a", (self.out_features, self.rank)), ("hada_w2_b", (self.rank, self.in_features))):
            setattr(self, name, nn.Parameter(torch.empty(*shape, **self.factory)))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(factor, a=math.sqrt(5))
            nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)

    def khatri_rao_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)`` with ``U V = (W1a W1b) o (W2a W2b)``: ``U`` out x r^2, ``V`` r^2 x in."""
        up = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(self.out_features, -1)
        down = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(-1, self.in_features)
        return up, down

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, squared = x.numel() // self.in_features, self.rank ** 2
        factored = tokens * squared * (self.in_features + self.out_features) + squared * (self.in_features + self.out_features)
        dense = (tokens + 2 * self.rank) * self.out_features * self.in_features
        if factored < dense:
            up, down = self.khatri_rao_factors()
            return self.project_out(self.project_in(x, down), up) * self.scaling
        return self.project_in(x, self.delta_weight())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.khatri_rao_factors()
        return self.scaling * up.detach().float(), down.detach().float()

    def peft_native(self) -> PeftNative | None:
        if self.kind != "linear":
            return None
        config = {"r": self.rank, "alpha": self.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                  "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {},
                  "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
                  "modules_to_save": None}
        return PeftNative("LOHA", config, {name: getattr(self, name)
                                           for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")})
