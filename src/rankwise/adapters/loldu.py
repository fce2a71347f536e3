"""LoLDU: low-rank adaptation via lower-diag-upper decomposition.

Shi, Wei, Wu, Ran, Sun, He & Yang 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper
Decomposition for Parameter-Efficient Fine-Tuning", arXiv 2410.13618.

The frozen weight (``out x in``) is factorised by LU with partial pivoting and rescaled to
``W = P L D U`` (``P`` a row permutation, ``L`` unit lower triangular ``out x k``, ``D`` the
diagonal of pivots, ``U`` unit upper triangular ``k x in``, ``k = min(out, in)``;
:func:`rankwise.linalg.decompositions.ldu`). The first ``r`` components move into the
adapter, the rest stays in the base:

    W_res = W - sigma_0 P L_r diag(d_0) U_r                (frozen base)
    h     = W_res x + sigma P L_r diag(z) U_r x
    z_0 = d_0 = D[:r] / sigma_0,   sigma_0 = alpha / r

``P L_r`` (stored as one ``out x r`` buffer ``PL_r``) and ``U_r`` are frozen; trainable are the
diagonal ``z`` (``r`` values) and the scalar scaling factor ``sigma``, the paper's
"scaled diagonal" ``sigma D_r`` -- ``r + 1`` parameters per layer. Option
``train_scaling=False`` freezes ``sigma`` at ``sigma_0`` (``r`` parameters), which is what
the authors' released code does (its parameter filter selects only the diagonal).

The pivots are divided by ``sigma_0`` so that ``W_res`` is exactly the LDU residual for every
``alpha`` (with the default ``alpha = r``, ``sigma_0 = 1`` and ``z_0 = D_r``, the paper's
"LU" initialisation of the diagonal); the output at init equals the base model's. The paper
also studies other initialisations of ``z`` (constant, uniform, normal); only the
decomposition's own values are implemented.

Rank limit: ``min(out, in)``; a zero pivot among the first ``r`` (the leading block of the
pivoted weight is rank-deficient) has no LDU and is refused -- choose a smaller rank.

Init cost: only the first ``r`` components are needed, and they are computed without the full
LU (:func:`~rankwise.linalg.decompositions.ldu` with ``rank``): partial pivoting picks each
pivot from the current column alone, so ``P L_r`` and the pivots come from the pivoted LU of
``W[:, :r]`` and ``U_r = L_11^{-1} W[piv, :]`` from one triangular solve -- the full LU's factors
up to rounding, at O(out r^2 + r^2 in) per layer instead of O(out in min(out, in)). Layer by
layer (no batching: what is left is one thin LU and one solve), on the weight's device in
float32 (fp16 / bf16 weights read in float32, residual written back in the weight's dtype);
``init_report(model)["residual_error"]`` gives each layer's ``||W - P L_r D_r U_r||_F / ||W||_F``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, FULL_PRECISION
from rankwise.adapters.rewrite import Factors, FactoredRewriteLayer, as_dtype
from rankwise.linalg.decompositions import ldu
from rankwise.options import Option


@ADAPTERS.register(
    "loldu",
    family="svd_init",
    paper="LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning",
    arxiv="2410.13618",
    supports=FULL_PRECISION,
)
class LolduLayer(FactoredRewriteLayer):
    """``W_res x + sigma P L_r diag(z) U_r x``; trainable ``z`` (r) and, by default, ``sigma``."""

    OPTIONS = {
        "train_scaling": Option(
            True, bool, help="train the scalar sigma too (False: only the diagonal, as the authors' code)"
        )
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.diagonal = nn.Parameter(torch.empty(self.rank, **self.factory))
        scaling = torch.empty((), **self.factory)
        if self.options["train_scaling"]:
            self.scaling = nn.Parameter(scaling)
        else:
            self.register_buffer("scaling", scaling)
        self.register_buffer("PL_r", torch.empty(self.out_features, self.rank, **self.factory))
        self.register_buffer("U_r", torch.empty(self.rank, self.in_features, **self.factory))
        self.register_buffer("diagonal_0", torch.empty(self.rank, **self.factory))
        self.register_buffer("scaling_0", torch.empty((), **self.factory))

    def initialize(self, stats: Any = None) -> None:
        try:
            perm, lower, pivots, upper = ldu(self.base_weight(), self.rank)
        except ValueError as exc:
            raise self.error(f"cannot take the LU decomposition of the weight ({exc})") from None
        if not (pivots != 0).all():
            first = int((pivots == 0).nonzero()[0])
            remedy = f"choose rank <= {first}" if first else "exclude this layer from targets"
            raise self.error(
                f"pivot {first} of the LU decomposition is zero (the weight is rank-deficient there), so the "
                f"first {self.rank} LDU components do not exist; {remedy}"
            )
        sigma_0 = self.alpha / self.rank
        with torch.no_grad():
            self.PL_r.copy_(lower[perm])
            self.U_r.copy_(upper)
            self.diagonal_0.copy_(pivots / sigma_0)
            self.scaling_0.fill_(sigma_0)
            self.diagonal.copy_(self.diagonal_0)
            self.scaling.copy_(self.scaling_0)

    def update_factors(self, dtype: torch.dtype | None = None) -> Factors:
        scaled = as_dtype(self.scaling, dtype) * as_dtype(self.diagonal, dtype)
        return as_dtype(self.PL_r, dtype) * scaled, as_dtype(self.U_r, dtype)

    def initial_factors(self, dtype: torch.dtype | None = None) -> Factors:
        scaled = as_dtype(self.scaling_0, dtype) * as_dtype(self.diagonal_0, dtype)
        return as_dtype(self.PL_r, dtype) * scaled, as_dtype(self.U_r, dtype)
