"""LoftQ: LoRA-fine-tuning-aware quantization of the base.

Li, Yu, Liang, He, Karampatziakis, Chen & Zhao 2023, "LoftQ: LoRA-Fine-Tuning-aware
Quantization for Large Language Models", arXiv 2310.08659.

QLoRA quantizes the base and starts LoRA at ``B A = 0``, so training starts from ``Q(W)``, off
the full-precision model by the whole quantization error. LoftQ chooses the quantized base
and the LoRA start together, so that ``Q + s B A`` approximates ``W``: with ``s = alpha / r``
and ``B_0 A_0 = 0``, for ``t = 1 .. T`` (``T = loftq_iter``; Algorithm 1)

    Q_t        = quant(W - s B_{t-1} A_{t-1})                 (the base, in 4 or 8 bits)
    s B_t A_t  = SVD_r(W - dequant(Q_t))                      (best rank-r fit of the residual)

with the split ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T`` (PiSSA's / PEFT's, so the
scaling does not change the product). The base layer is REPLACED by the bitsandbytes layer
holding ``Q_T`` (``scheme`` nf4 / fp4 / int8, ``double_quant``, ``blocksize`` as
:func:`rankwise.quantize`); ``A``, ``B`` train in the compute dtype. ``T = 1`` is QLoRA's
quantized base with the LoRA started at the best rank-r fit of its quantization error.

So the method takes a FULL-PRECISION base (Linear, Conv1D) and leaves a quantized one; the
output at init is ``Q_T + s B_T A_T``, close to but not equal to the base model's (the paper's
point: closer than ``Q(W)``). The original ``W`` is not kept: ``disable_adapter`` gives the
quantized base, ``original_weight()`` the dequantized ``Q_T``, and merges are lossy. The
factors ``B_{T-1}``, ``A_{T-1}`` used for the last quantization are kept as buffers, so a saved
adapter loaded onto the same full-precision base rebuilds exactly the same ``Q_T``.

Deviations: PEFT's ``LoftQConfig`` path quantizes NF4 without double quantization, keeps the
dequantized ``Q_T`` in full precision (to be re-quantized when the model is reloaded in
4 bits) and does not divide the factors by ``s``; here the base is held quantized at once,
double quantization is the default (QLoRA's), and the split is scaling-aware. PEFT's
implementation runs on CUDA / XPU only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, FULL_PRECISION
from rankwise.adapters.lora_family import StandardLoraLayer
from rankwise.layers import SCHEMES, dense_weight, quantized_linear
from rankwise.linalg.svd import SVDFailure, truncated_svd
from rankwise.options import Option


@ADAPTERS.register(
    "loftq",
    family="quantized_init",
    paper="LoftQ: LoRA-Fine-Tuning-aware Quantization for Large Language Models",
    arxiv="2310.08659",
    supports=FULL_PRECISION,
)
class LoftqLayer(StandardLoraLayer):
    """LoRA over the quantized base ``Q_T``, both chosen by alternating quantization and SVD."""

    OPTIONS = {
        "scheme": Option("nf4", str, choices=SCHEMES, help="quantization of the base: nf4, fp4 (4-bit) or int8"),
        "loftq_iter": Option(1, int, low=1, help="alternating steps T (quantize, then SVD of the residual)"),
        "double_quant": Option(True, bool, help="quantize the 4-bit absmax constants too (QLoRA)"),
        "blocksize": Option(64, int, choices=(64, 128, 256, 512, 1024, 2048, 4096),
                            help="values per absmax block of the 4-bit schemes"),
    }
    replaces_base = True

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        # the factors subtracted from W before the last quantization (zero when loftq_iter = 1)
        self.register_buffer("A_q", torch.zeros(self.rank, self.in_features, **self.factory))
        self.register_buffer("B_q", torch.zeros(self.out_features, self.rank, **self.factory))

    def quantize_base(self, weight: torch.Tensor) -> nn.Module:
        """The bitsandbytes layer holding ``quant(weight - s B_q A_q)`` (and the base's bias)."""
        residual = weight - self.scaling * (self.B_q.float() @ self.A_q.float())
        return quantized_linear(residual, getattr(self.base, "bias", None), self.options["scheme"],
                                compute_dtype=self.factory["dtype"], double_quant=self.options["double_quant"],
                                blocksize=self.options["blocksize"])

    def initialize(self, stats: Any = None) -> None:
        if self.siblings:
            raise self.error("loftq replaces the base layer by its quantization; adapt a layer that holds no "
                             "other adapter")
        weight = self.base_weight()
        up = torch.zeros(self.out_features, self.rank, device=weight.device)
        down = torch.zeros(self.rank, self.in_features, device=weight.device)
        for _ in range(self.options["loftq_iter"]):
            with torch.no_grad():
                self.A_q.copy_(down)
                self.B_q.copy_(up)
            quantized = dense_weight(self.quantize_base(weight), torch.float32)
            try:
                u, s, vh = truncated_svd(weight - quantized, self.rank)
            except SVDFailure as exc:
                raise self.error(f"cannot take the SVD of the quantization residual ({exc})") from None
            root = (s / self.scaling).sqrt()
            up, down = u * root, root[:, None] * vh
        with torch.no_grad():
            self.lora_A.copy_(down)
            self.lora_B.copy_(up)

    def apply_base_rewrite(self) -> None:
        """Replace the base by ``quant(W - s B_q A_q)`` -- after ``initialize`` and after ``load_adapter``."""
        with torch.no_grad():
            quantized = self.quantize_base(self.base_weight())
        quantized.train(self.base.training)
        self.base = quantized
        self.kind = "linear8bit" if self.options["scheme"] == "int8" else "linear4bit"
