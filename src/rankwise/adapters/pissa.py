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

Init cost: the SVDs of same-shape layers run as one batched call (chunks of at most
:data:`rankwise.adapters.rewrite.BATCH_NUMBERS` weight entries), on the weights' own device,
in float32 (fp16 / bf16 weights are read in float32 and the residual is written back in the
weight's dtype); ``init_report(model)["residual_error"]`` gives each layer's
``||W_res||_F / ||W||_F`` (the exact SVD's is the least possible; compare a randomized init with it).

Trainable parameters per layer: ``r (in + out)``. The initial factors are kept as buffers
(``A0``, ``B0``) so that a saved adapter turns a fresh base into the same residual on load
and exports can reconstruct ``W``.
"""

from __future__ import annotations

from typing import Any

from rankwise.adapters.base import ADAPTERS, FULL_PRECISION
from rankwise.adapters.rewrite import BatchedPrincipalInit, LoraRewriteLayer, principal_triplets
from rankwise.common_options import NITER


@ADAPTERS.register(
    "pissa",
    family="svd_init",
    paper="PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models",
    arxiv="2404.02948",
    supports=FULL_PRECISION,
)
class PissaLayer(BatchedPrincipalInit, LoraRewriteLayer):
    """``W_res x + s B A x`` with ``B A`` initialised to the principal rank-r part of ``W``."""

    OPTIONS = {"niter": NITER}

    def initialize(self, stats: Any = None) -> None:
        u, s, vh = principal_triplets(self)
        root = (s / self.scaling).sqrt()
        self.start_from(u * root, root[:, None] * vh)
