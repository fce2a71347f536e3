"""SORSA: singular values and orthonormal regularized singular vectors adaptation.

Cao 2024, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of
Large Language Models", arXiv 2409.00055.

The frozen weight is split by its SVD ``W = U diag(S) V^T`` into a principal part, whose
factors are all trainable, and a frozen residual:

    W_res = W - U_r diag(S_r) V_r^T                       (frozen base)
    h     = W_res x + s U_p diag(S_p) V_p^T x,   U_p (out x r), S_p (r), V_p^T (r x in) trainable
    U_p = U_r,  S_p = S_r / s,  V_p^T = V_r^T              at init

with ``s = alpha / r`` (the paper has no alpha: ``s = 1``, the default ``alpha = r``; for other
alphas ``S_p`` starts at ``S_r / s`` so that the residual is the paper's and the output at
init equals the base model's). Training adds the orthonormal regulariser

    L_reg = gamma * ( ||U_p^T U_p - I||_F^2 + ||V_p^T V_p - I||_F^2 )

(``V_p^T V_p`` here is ``Vh_p Vh_p^T``, ``r x r``), returned by :meth:`SorsaLayer.regularization`;
``rankwise.adapters.regularization_loss(model)`` sums it over the layers and the training loop
adds it to the task loss.

Deviations: the paper applies the regulariser's gradient as a separate step with its own
rate ``gamma`` (outside the adaptive optimizer's preconditioning), and the authors' code
uses the unsquared Frobenius norm averaged over matrices; here the squared norms, times
``gamma``, are an ordinary loss term that goes through the chosen optimizer. Option
``gamma`` (default 4e-4, the value of the authors' README; 0 disables the term) and
``niter`` (None = exact SVD, an integer = randomized SVD, as for ``pissa``).

Trainable parameters per layer: ``r (out + in) + r``. Buffers ``U_0``, ``S_0``, ``Vh_0`` keep
the initial factors (the part moved out of the base).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, FULL_PRECISION
from rankwise.adapters.rewrite import (
    BatchedPrincipalInit,
    Factors,
    FactoredRewriteLayer,
    as_dtype,
    principal_triplets,
)
from rankwise.common_options import NITER
from rankwise.options import Option


@ADAPTERS.register(
    "sorsa",
    family="svd_init",
    paper="SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of Large Language Models",
    arxiv="2409.00055",
    supports=FULL_PRECISION,
)
class SorsaLayer(BatchedPrincipalInit, FactoredRewriteLayer):
    """``W_res x + s U_p diag(S_p) V_p^T x`` with all three principal factors trainable."""

    OPTIONS = {
        "gamma": Option(4e-4, float, low=0, help="weight of the orthonormal regulariser (0 disables it)"),
        "niter": NITER,
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.gamma = self.options["gamma"]
        self.scaling = self.alpha / self.rank
        self.U_p = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))
        self.S_p = nn.Parameter(torch.empty(self.rank, **self.factory))
        self.Vh_p = nn.Parameter(torch.empty(self.rank, self.in_features, **self.factory))
        self.register_buffer("U_0", torch.empty(self.out_features, self.rank, **self.factory))
        self.register_buffer("S_0", torch.empty(self.rank, **self.factory))
        self.register_buffer("Vh_0", torch.empty(self.rank, self.in_features, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        u, s, vh = principal_triplets(self)
        with torch.no_grad():
            for start, trainable, value in (
                (self.U_0, self.U_p, u),
                (self.S_0, self.S_p, s / self.scaling),
                (self.Vh_0, self.Vh_p, vh),
            ):
                start.copy_(value)
                trainable.copy_(start)

    def update_factors(self, dtype: torch.dtype | None = None) -> Factors:
        return as_dtype(self.U_p, dtype) * (self.scaling * as_dtype(self.S_p, dtype)), as_dtype(self.Vh_p, dtype)

    def initial_factors(self, dtype: torch.dtype | None = None) -> Factors:
        return as_dtype(self.U_0, dtype) * (self.scaling * as_dtype(self.S_0, dtype)), as_dtype(self.Vh_0, dtype)

    def regularization(self) -> torch.Tensor | None:
        """``gamma (||U_p^T U_p - I||_F^2 + ||Vh_p Vh_p^T - I||_F^2)`` in float32; None when gamma is 0."""
        if self.gamma == 0:
            return None
        u, vh = self.U_p.float(), self.Vh_p.float()
        eye = torch.eye(self.rank, device=u.device, dtype=u.dtype)
        return self.gamma * ((u.T @ u - eye).square().sum() + (vh @ vh.T - eye).square().sum())
