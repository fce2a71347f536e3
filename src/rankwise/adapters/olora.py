"""OLoRA: orthonormal low-rank adaptation.

Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
arXiv 2406.01775.

With the reduced QR decomposition of the frozen weight ``W = Q R`` (``Q`` ``out x k`` with
orthonormal columns, ``R`` ``k x in`` upper triangular, ``k = min(out, in)``) and the LoRA
scaling ``s = alpha / r``:

    B = Q[:, :r]                   (out x r, trainable; orthonormal columns at init)
    A = R[:r, :]                   (r x in,  trainable)
    W_res = W - s B A              (frozen base)
    h = W_res x + s B A x

so the output at init equals the base model's for every ``alpha``. As in the paper (and
PEFT's ``init_lora_weights="olora"``) the factors are not rescaled by ``s``: for
``alpha != r`` the residual is ``W - s Q_r R_r``, not ``W - Q_r R_r``.

Deviation: the signs of the QR factors are fixed so that ``diag(R) >= 0``
(:func:`rankwise.linalg.decompositions.signed_qr`); Householder QR is only unique up to the
sign of each column of ``Q`` and row of ``R``, and the product ``B A`` (hence the residual
and the training trajectory up to those signs) is the same either way.

Init cost: only the first r columns of ``Q`` and rows of ``R`` are needed, and they are
computed without the full QR -- ``Q_r R_11`` is the (signed) thin QR of ``W[:, :r]`` and
``R[:r, :] = Q_r^T W`` (:func:`~rankwise.linalg.decompositions.signed_qr` with ``rank``): the
same factors as the full QR's up to rounding, at O(out r^2 + out in r) per layer instead of
O(out in min(out, in)). Layer by layer (no batching: the cost is one thin QR and one matmul),
on the weight's device, in float32 (fp16 / bf16 weights are read in float32; the residual is
written back in the weight's dtype); ``init_report(model)["residual_error"]`` gives each
layer's ``||W - s Q_r R_r||_F / ||W||_F``. Trainable parameters
per layer: ``r (in + out)``; the initial factors are kept as buffers ``A0``, ``B0``.
"""

from __future__ import annotations

from typing import Any

from rankwise.adapters.base import ADAPTERS, FULL_PRECISION
from rankwise.adapters.rewrite import LoraRewriteLayer
from rankwise.linalg.decompositions import signed_qr


@ADAPTERS.register(
    "olora",
    family="svd_init",
    paper="OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
    arxiv="2406.01775",
    supports=FULL_PRECISION,
)
class OloraLayer(LoraRewriteLayer):
    """``W_res x + s B A x`` with ``B, A`` the first r columns / rows of ``Q, R`` of ``W = QR``."""

    def initialize(self, stats: Any = None) -> None:
        try:
            q, r = signed_qr(self.base_weight(), self.rank)
        except ValueError as exc:
            raise self.error(f"cannot take the QR decomposition of the weight ({exc})") from None
        self.start_from(q, r)
