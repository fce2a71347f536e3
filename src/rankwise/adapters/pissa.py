"""PiSSA: principal singular values and singular vectors adaptation.

Meng, Wang & Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models", arXiv 2404.02948.

With the thin SVD of the frozen weight ``W = U diag(S) V^T`` (``out x in``) and the LoRA
scaling ``s = alpha / r``, the adapter starts from the principal rank-``r`` part and the base
keeps the rest:

    A = diag(sqrt(S_r / s)) V_r^T          (r x in,  trainable)
    B = U_r diag(sqrt(S_r / s))            (out x r, trainable)
    W_res = W - s B A = U_[r:] diag(S_[r:]) V_[r:]^T      (frozen base)
    h = W_res x + s B A x

so the output at init equals the base model's for every ``alpha`` and the residual is
exactly the paper's. With ``alpha = r`` (the default) ``s = 1`` and this is the paper's
``A = S_r^{1/2} V_r^T``, ``B = U_r S_r^{1/2}``; dividing ``S_r`` by ``s`` for other alphas is
the convention of PEFT's ``init_lora_weights="pissa"``, so adapters are interchangeable.

Option ``niter``: ``None`` (default) runs the exact thin SVD; an integer runs the paper's
fast variant, a randomized SVD with ``niter`` subspace (power) iterations
(:func:`rankwise.linalg.randomized_svd`, Halko et al. 2011; PEFT's ``"pissa_niter_K"``).
The randomized sketch draws from torch's global RNG (seed it with ``torch.manual_seed``).

Init cost: the SVD runs on one layer at a time, on the weight's own device, in float32
(fp16 / bf16 weights are read in float32 and the residual is written back in the weight's
dtype); peak extra memory is one layer's factors.

Trainable parameters per layer: ``r (in + out)``. The initial factors are kept as buffers
(``A0``, ``B0``) so that a saved adapter turns a fresh base into the same residual on load
and exports can reconstruct ``W``.

This module also holds what the data-free decomposition inits share
(:class:`FactoredRewriteLayer`, :func:`check_niter`, :func:`principal_triplets`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, AdapterLayer
from rankwise.linalg import SVDFailure, truncated_svd

Factors = tuple[torch.Tensor, torch.Tensor]


class FactoredRewriteLayer(AdapterLayer):
    """A base-rewriting adapter whose update and base offset are products of two factors.

    Subclasses define :meth:`update_factors` (trainable, ``left @ right`` is the update with
    any scaling folded in) and :meth:`initial_factors` (from buffers: what was moved out of
    the base). Everything else -- ``delta_weight``, the thin-matmul forward, ``base_offset``
    and the PEFT-export views :meth:`lora_factors` / :meth:`base_offset_factors` -- follows.
    """

    rewrites_base = True

    def update_factors(self, dtype: torch.dtype | None = None) -> Factors:
        """``(left, right)``, ``out x k`` and ``k x in``, with ``left @ right == delta_weight()``."""
        raise NotImplementedError

    def initial_factors(self, dtype: torch.dtype | None = None) -> Factors:
        """``(left0, right0)`` with ``left0 @ right0 == base_offset()``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        left, right = self.update_factors()
        return left @ right

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.update_factors()
        # Two thin products (tokens x k) instead of materialising the out x in update.
        return (x.to(right.dtype) @ right.T) @ left.T

    def base_offset(self) -> torch.Tensor:
        """``left0 @ right0`` in float32 (the residual ``W - offset`` is then rounded once, to the weight's dtype)."""
        left, right = self.initial_factors(torch.float32)
        return left @ right

    def lora_factors(self) -> Factors:
        """``(B, A)`` in float32 with ``B @ A == delta_weight()`` (scaling folded in), for PEFT export."""
        left, right = self.update_factors(torch.float32)
        return left.detach(), right.detach()

    def base_offset_factors(self) -> Factors:
        """``(B0, A0)`` in float32 with ``B0 @ A0 == base_offset()``, for PEFT export."""
        left, right = self.initial_factors(torch.float32)
        return left.detach(), right.detach()


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` converted to ``dtype``; unchanged when ``dtype`` is None (the stored dtype)."""
    return tensor if dtype is None else tensor.to(dtype)


def check_niter(layer: AdapterLayer) -> None:
    """The ``niter`` option: None (exact SVD) or a non-negative integer (randomized SVD)."""
    niter = layer.options["niter"]
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise layer.error(
            f"niter must be None (exact SVD) or a non-negative integer (randomized SVD with that many "
            f"power iterations, e.g. 4), got {niter!r}"
        )


def principal_triplets(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` ``U_r, S_r, Vh_r`` of the layer's weight in float32, on its device."""
    try:
        return truncated_svd(layer.base.weight, layer.rank, niter=layer.options["niter"])
    except SVDFailure as exc:
        raise layer.error(f"cannot take the SVD of the weight ({exc}); check the model's weights") from None


class LoraRewriteLayer(FactoredRewriteLayer):
    """LoRA-shaped rewrite: trainable ``lora_A`` (r x in) and ``lora_B`` (out x r) start at the
    buffers ``A0`` / ``B0``; the update is ``s B A`` with ``s = alpha / r``. Subclasses compute
    the initial factors in :meth:`initialize` and hand them to :meth:`start_from`."""

    output_factor_names = ("lora_B",)  # the B factor LoRA+ gives its own learning rate

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))
        self.register_buffer("A0", torch.empty(self.rank, self.in_features, **self.factory))
        self.register_buffer("B0", torch.empty(self.out_features, self.rank, **self.factory))

    def start_from(self, b0: torch.Tensor, a0: torch.Tensor) -> None:
        """Store the initial factors (cast to the weight's dtype) and start the trainable ones there."""
        with torch.no_grad():
            self.A0.copy_(a0)
            self.B0.copy_(b0)
            self.lora_A.copy_(self.A0)
            self.lora_B.copy_(self.B0)

    def update_factors(self, dtype: torch.dtype | None = None) -> Factors:
        return self.scaling * as_dtype(self.lora_B, dtype), as_dtype(self.lora_A, dtype)

    def initial_factors(self, dtype: torch.dtype | None = None) -> Factors:
        return self.scaling * as_dtype(self.B0, dtype), as_dtype(self.A0, dtype)


@ADAPTERS.register("pissa")
class PissaLayer(LoraRewriteLayer):
    """``W_res x + s B A x`` with ``B A`` initialised to the principal rank-r part of ``W``."""

    OPTIONS = {"niter": None}

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        check_niter(self)

    def initialize(self, stats: Any = None) -> None:
        u, s, vh = principal_triplets(self)
        root = (s / self.scaling).sqrt()
        self.start_from(u * root, root[:, None] * vh)
