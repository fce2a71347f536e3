"""SVFit: train the top-r singular values that scale the fixed principal subspaces.

Sun, Wei, Wu, Shi, He, Ma, Xie & Yang 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large
Pre-Trained Models Using Singular Values", arXiv 2409.05926.

The frozen weight is split by its SVD ``W = U diag(S) V^T`` into the best rank-``r``
approximation and the rest, ``W = W_r + W_e``. The singular vectors ``U_r``, ``V_r`` and the
residual ``W_e`` are frozen; the ``r`` singular values of ``W_r`` are the only trainable
parameters:

    W_e = W - U_r diag(S_r) V_r^T                       (frozen base)
    h   = W_e x + s U_r diag(sigma) V_r^T x,   sigma in R^r trainable, sigma_0 = S_r / s

with ``s = alpha / r``. The paper has no ``alpha`` (``s = 1``, the default ``alpha = r``);
for other alphas ``sigma`` starts at ``S_r / s`` so that ``W_e`` is the paper's residual and
the output at init equals the base model's, and ``alpha`` only rescales the step size of
``sigma`` (the PiSSA / PEFT convention).

The paper motivates ``r`` by the top singular values holding most (over 99%) of the
weight's information; here ``r`` is the ``rank`` the user passes (no automatic choice).

Option ``niter``: None = exact thin SVD, an integer = randomized SVD with that many power
iterations (as for ``pissa``). Computed per layer on the weight's device in float32.

Trainable parameters per layer: ``r``. Buffers: ``U_r`` (out x r), ``Vh_r`` (r x in) and the
initial values ``S_0``.
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


@ADAPTERS.register(
    "svfit",
    family="svd_init",
    paper="SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
    arxiv="2409.05926",
    supports=FULL_PRECISION,
)
class SvfitLayer(BatchedPrincipalInit, FactoredRewriteLayer):
    """``W_e x + s U_r diag(sigma) V_r^T x`` with only the r singular values ``sigma`` trainable."""

    OPTIONS = {"niter": NITER}

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        self.singular_values = nn.Parameter(torch.empty(self.rank, **self.factory))
        self.register_buffer("U_r", torch.empty(self.out_features, self.rank, **self.factory))
        self.register_buffer("Vh_r", torch.empty(self.rank, self.in_features, **self.factory))
        self.register_buffer("S_0", torch.empty(self.rank, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        u, s, vh = principal_triplets(self)
        with torch.no_grad():
            self.U_r.copy_(u)
            self.Vh_r.copy_(vh)
            self.S_0.copy_(s / self.scaling)
            self.singular_values.copy_(self.S_0)

    def update_factors(self, dtype: torch.dtype | None = None) -> Factors:
        return self._scaled_subspaces(self.singular_values, dtype)

    def initial_factors(self, dtype: torch.dtype | None = None) -> Factors:
        return self._scaled_subspaces(self.S_0, dtype)

    def _scaled_subspaces(self, values: torch.Tensor, dtype: torch.dtype | None) -> Factors:
        """``(U_r diag(s * values), Vh_r)``."""
        return as_dtype(self.U_r, dtype) * (self.scaling * as_dtype(values, dtype)), as_dtype(self.Vh_r, dtype)
