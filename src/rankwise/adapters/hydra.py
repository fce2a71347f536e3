"""Hydra: a parallel low-rank branch plus a sequential one acting on the pre-trained features.

Kim, Yang, Kim, Hong & Park 2023, "Hydra: Multi-head Low-rank Adaptation for Parameter
Efficient Fine-tuning", arXiv 2309.06922.

A frozen ``out x in`` weight ``W0`` gets two low-rank branches: the parallel one sees the
layer's input (LoRA), the sequential one sees the layer's pre-trained output ``W0 x`` (a
linear combination of the pre-trained features):

    h = W0 x + s B_p A_p x + s B_s A_s (W0 x)
      = (W0 + dW) x,    dW = s (B_p A_p + B_s A_s W0),    s = alpha / r

``A_p`` (r x in), ``B_p`` (out x r), ``A_s`` (r_s x out), ``B_s`` (out x r_s), ``r`` = ``rank``,
``r_s`` = option ``sequential_rank`` (None: ``r``; the authors' GLUE scripts use 4 parallel
and 8 sequential). Both ``A`` are kaiming-uniform and both ``B`` zero, as in the authors'
release, so the output equals the base model's at init. Trainable parameters per layer:
``r (in + out) + 2 r_s out``.

The unmerged forward never forms ``dW``: it applies the rank-``(r + r_s)`` factors
``[B_p, B_s]`` and ``[A_p; A_s W0]`` (``A_s W0`` costs ``r_s out in``, less than ``W0 x`` for
more than ``r_s`` tokens). The same factors are exact for the PEFT LoRA export
(:meth:`HydraLayer.lora_factors`, rank ``r + r_s``). Once merged the stored weight is
``W' = (I + s B_s A_s) W0 + s B_p A_p``; ``W0`` is recovered with the Woodbury identity
(an ``r_s x r_s`` solve), which fails -- with an error, nothing written -- only when
``I + s A_s B_s`` is singular.

Deviations: the sequential branch acts on ``W0 x`` without the base layer's bias (the
authors apply it to ``W0 x + b``, which also changes the bias, ``b' = b + s B_s A_s b``), so
that the update is a pure weight update that merges into ``W`` alone; on bias-free layers
(LLaMA) the two agree. The authors place one Hydra pair on the attention output projection
and the FFN output layer of each block; here it goes on every targeted layer (pass
``targets=[...]`` for the paper's placement). One scaling ``s`` serves both branches (the
release has none: ``s = 1``, the default ``alpha = r``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer
from rankwise.options import Option


@ADAPTERS.register(
    "hydra",
    family="multi_branch",
    paper="Hydra: Multi-head Low-rank Adaptation for Parameter Efficient Fine-tuning",
    arxiv="2309.06922",
    supports=LINEAR_LIKE,
)
class HydraLayer(AdapterLayer):
    """``W0 x + s B_p A_p x + s B_s A_s W0 x``: a parallel and a sequential low-rank branch."""

    OPTIONS = {
        "sequential_rank": Option(None, int, low=1, nullable=True,
                                  help="rank r_s of the sequential branch (at most out); None = rank"),
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.sequential_rank = self.options["sequential_rank"] or self.rank
        if self.sequential_rank > self.out_features:
            raise self.error(f"sequential_rank={self.sequential_rank} exceeds the layer's output size "
                             f"{self.out_features}; choose at most {self.out_features}")
        self.scaling = self.alpha / self.rank
        self.hydra_par_A = nn.Parameter(torch.empty(self.rank, self.in_features, **self.factory))
        self.hydra_par_B = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))
        self.hydra_seq_A = nn.Parameter(torch.empty(self.sequential_rank, self.out_features, **self.factory))
        self.hydra_seq_B = nn.Parameter(torch.empty(self.out_features, self.sequential_rank, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            for down, up in ((self.hydra_par_A, self.hydra_par_B), (self.hydra_seq_A, self.hydra_seq_B)):
                nn.init.kaiming_uniform_(down, a=math.sqrt(5))
                nn.init.zeros_(up)

    def pretrained_weight(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """``W0``: the base weight, or -- once this adapter is merged into it -- ``W0`` recovered from
        ``W' = (I + U V) W0 + P`` (``U = s B_s``, ``V = A_s``, ``P = s B_p A_p``) by Woodbury:
        ``W0 = R - U (I + V U)^{-1} V R`` with ``R = W' - P``."""
        if not self.merged:
            return self.base_weight(dtype)
        with torch.no_grad():
            merged = self.base_weight(torch.float64)
            up = self.scaling * self.hydra_seq_B.detach().double()
            down = self.hydra_seq_A.detach().double()
            rest = merged - self.scaling * self.hydra_par_B.detach().double() @ self.hydra_par_A.detach().double()
            core = torch.eye(self.sequential_rank, dtype=torch.float64, device=merged.device) + down @ up
            solved, info = torch.linalg.solve_ex(core, down @ rest)
            if info.item() != 0 or not torch.isfinite(solved).all():
                raise self.error("cannot recover the pre-trained weight from the merged one: I + s A_s B_s is "
                                 "singular (the sequential branch annihilates a direction of W0); reload the "
                                 "base model and load the saved adapter instead of unmerging")
            weight = rest - up @ solved
        return weight if dtype is None else weight.to(dtype)

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B_p, B_s], [A_p; A_s W0])``: ``dW = s * up @ down``."""
        up = torch.cat([self.hydra_par_B, self.hydra_seq_B], dim=1)
        down = torch.cat([self.hydra_par_A, self.hydra_seq_A @ weight.to(self.hydra_seq_A.dtype)], dim=0)
        return up, down

    def delta_weight(self) -> torch.Tensor:
        up, down = self.factors(self.pretrained_weight(self.hydra_par_A.dtype))
        return self.scaling * (up @ down)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.factors(self.pretrained_weight(self.hydra_par_A.dtype))
        return self.project_out(self.project_in(x, down), up) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s [B_p, B_s], [A_p; A_s W0])`` in fp32: the update is exactly rank ``r + r_s`` factored."""
        with torch.no_grad():
            up, down = self.factors(self.pretrained_weight(torch.float32))
            return self.scaling * up.float(), down.float()
