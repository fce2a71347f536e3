"""What the SVD-triplet methods share (AdaLoRA, IncreLoRA): an update ``P diag(sigma) Q``.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv 2303.10512 (eqs. 3-4, 7-9), the parametrisation IncreLoRA (arXiv 2308.12043) reuses:

    delta = P diag(sigma) Q,   P in R^{out x r}, lambda in R^r, Q in R^{r x in} trainable

with ``sigma = effective_singular_values()`` (each method folds its scaling and masks into it),
``lambda = 0`` and Gaussian ``P``, ``Q`` at init (so the model equals the base model; standard
deviations ``1/sqrt(out)`` and ``1/sqrt(in)`` give columns / rows of unit expected norm), the
orthogonality regulariser (eq. 4)

    R(P, Q) = gamma * (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2),     gamma = ``orth_reg_weight``,

and the smoothed sensitivity of eqs. 8-9 (:func:`update_smoothed_importance`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import AdapterLayer
from rankwise.options import Option

#: beta1 / beta2 of the importance EMAs (AdaLoRA and IncreLoRA default 0.85)
SMOOTHING = Option(0.85, float, low=0, high=1, low_open=True, high_open=True, help="EMA coefficient of the importance")


def update_smoothed_importance(
    average: torch.Tensor, uncertainty: torch.Tensor, current: torch.Tensor, beta1: float, beta2: float
) -> None:
    """In place: ``Ibar = b1 Ibar + (1-b1) I``; ``Ubar = b2 Ubar + (1-b2) |I - Ibar|`` (new ``Ibar``)."""
    average.mul_(beta1).add_(current, alpha=1.0 - beta1)
    uncertainty.mul_(beta2).add_((current - average).abs(), alpha=1.0 - beta2)


class SvdTripletLayer(AdapterLayer):
    """``delta = P diag(sigma) Q`` with trainable ``P`` (out x r), ``lambda`` (r), ``Q`` (r x in).

    ``sigma = effective_singular_values()`` (subclasses fold scaling and masks into it);
    ``regularization()`` is the orthogonality penalty on the rows in ``regularized_rows()``.
    """

    OPTIONS = {
        "orth_reg_weight": Option(0.1, float, low=0, help="weight gamma of the orthogonality regulariser (0 = off)")
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.lora_P = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))
        self.lora_lambda = nn.Parameter(torch.empty(self.rank, **self.factory))
        self.lora_Q = nn.Parameter(torch.empty(self.rank, self.in_features, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            nn.init.normal_(self.lora_P, std=1.0 / math.sqrt(self.out_features))
            nn.init.normal_(self.lora_Q, std=1.0 / math.sqrt(self.in_features))
            nn.init.zeros_(self.lora_lambda)

    def effective_singular_values(self) -> torch.Tensor:
        raise NotImplementedError

    def regularized_rows(self) -> torch.Tensor | None:
        """Boolean mask of the triplets the orthogonality penalty covers (None: all)."""
        return None

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_P * self.effective_singular_values()) @ self.lora_Q

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.lora_Q.dtype) @ self.lora_Q.T) * self.effective_singular_values()) @ self.lora_P.T

    def regularization(self) -> torch.Tensor | None:
        weight = self.options["orth_reg_weight"]
        if weight == 0.0:
            return None
        rows = self.regularized_rows()
        left = self.lora_P.float() if rows is None else self.lora_P.float()[:, rows]
        right = self.lora_Q.float() if rows is None else self.lora_Q.float()[rows]
        eye = torch.eye(left.shape[1], device=left.device)
        return weight * ((left.T @ left - eye).square().sum() + (right @ right.T - eye).square().sum())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in fp32 with ``B @ A == delta_weight()``; triplets with sigma = 0 dropped."""
        with torch.no_grad():
            sigma = self.effective_singular_values().float()
            keep = sigma != 0
            return (self.lora_P.float()[:, keep] * sigma[keep]).contiguous(), self.lora_Q.float()[keep].contiguous()

    def effective_rank(self) -> int:
        """Number of triplets with a non-zero singular value."""
        return int((self.effective_singular_values() != 0).sum())
