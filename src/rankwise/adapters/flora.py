"""FLoRA: a low-rank Tucker core space for N-dimensional weights (Linear: N = 2, Conv2d: N = 4).

Si et al. 2024, "FLoRA: Low-Rank Core Space for N-dimension", arXiv 2405.14739 (ICLR 2025).

The update keeps the weight's own modes: for a weight with modes ``(out, in, k_1, ...)`` it is a
Tucker product of a small trainable core with one trainable factor per mode::

    dW = s * G x_1 U_out x_2 U_in x_3 U_h x_4 U_w        G: r_out x r_in x r_h x r_w,  U_d: d x r_d

(``x_k`` the mode-``k`` product; for a Linear layer ``dW = s U_out G U_in^T``, a LoRA with an
``r x r`` core in the middle). Every mode's rank is ``r_d = min(rank, d)`` (a Tucker rank cannot
usefully exceed its mode). Init as the authors' code: the factors ``kaiming_normal`` with
``a = sqrt 3`` (std ``1 / sqrt(2 r_d)``), the core zero, so the update is zero at init.
Scaling ``s = alpha / rank`` (the authors' ``scale``; 1 at the default ``alpha = rank``).
Trainable parameters: ``prod_d r_d + sum_d d r_d`` -- Linear: ``r^2 + r (in + out)``.

Unfolded along the output mode the update is exactly ``dW = s U_out M`` with ``M = G x_2 U_in
x_3 U_h x_4 U_w`` (``r_out x in kh kw``), so the forward never forms it: a convolution (Linear:
a product) of the input with ``M`` down to ``r_out`` channels, with the layer's stride, padding
and dilation, then ``U_out`` (a 1 x 1 convolution) -- the authors form the kernel update instead.

Deviations: per-mode ranks are all ``min(rank, d)`` (the authors take a list). No PEFT form
exists: ``(s U_out, M)`` are exact LoRA factors, so the export is an exact rank-``r_out`` LoRA
(PEFT's Conv2d LoRA layout for convolutions).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer


@ADAPTERS.register(
    "flora",
    family="tucker",
    paper="FLoRA: Low-Rank Core Space for N-dimension",
    arxiv="2405.14739",
    supports=LINEAR_LIKE + ("conv2d",),
)
class FloraLayer(AdapterLayer):
    """``s * G x U_out x U_in (x U_h x U_w)``: a trainable Tucker core and a factor per weight mode."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.modes = [self.out_features, self.in_features] if self.kind != "conv2d" else list(base.weight.shape)
        ranks = [min(self.rank, d) for d in self.modes]
        self.scaling = self.alpha / self.rank
        self.flora_core = nn.Parameter(torch.empty(*ranks, **self.factory))
        self.flora_factors = nn.ParameterList(
            nn.Parameter(torch.empty(d, r, **self.factory)) for d, r in zip(self.modes, ranks)
        )

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            for factor in self.flora_factors:
                nn.init.kaiming_normal_(factor, a=math.sqrt(3))
            self.flora_core.zero_()

    def output_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_out, M)`` with ``dW = s U_out M``: ``M`` (``r_out x`` the other modes, flattened) is the
        core multiplied by every factor but the output one -- the update's exact rank-``r_out`` split."""
        up, *others = self.flora_factors
        inner = self.flora_core
        for mode, factor in enumerate(others, start=1):
            inner = torch.movedim(torch.tensordot(inner, factor, dims=([mode], [1])), -1, mode)
        return up, inner.reshape(inner.shape[0], -1)

    def delta_weight(self) -> torch.Tensor:
        up, inner = self.output_split()
        return self.scaling * (up @ inner)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # a convolution (Linear: product) down to r_out channels, then U_out: never the full kernel update
        up, inner = self.output_split()
        return self.project_out(self.project_in(x, inner), up) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        up, inner = self.output_split()
        return self.scaling * up.detach().float(), inner.detach().float()
