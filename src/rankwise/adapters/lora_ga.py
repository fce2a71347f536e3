"""LoRA-GA: LoRA initialised so its first step follows the full fine-tuning gradient.

Wang, Yu & Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv 2407.05000.

The data gives ``G = mean_b dL_b/dW`` (``out x in``) of the frozen weight (statistic
``weight_gradient``). With ``W' = W_res + s B A`` one SGD step of size ``lr`` on ``A, B``
changes the weight by ``-lr s^2 (B B^T G + G A^T A) + O(lr^2)``. With ``G = U diag(S) V^T``,

    B0 = c * U[:, 1:r]          A0 = c * V[:, r+1:2r]^T          (default ``direction="A2rBr"``)
    B0 = c * U[:, r+1:2r]       A0 = c * V[:, 1:r]^T             (``direction="ArB2r"``)

makes ``B0 B0^T G + G A0^T A0 = c^2 * (rank-2r truncated SVD of G)``: the first low-rank
update is the best rank-2r approximation of the full gradient step (the paper's gradient
approximation theorem; index sets ``1:r`` and ``r+1:2r`` are disjoint, so the two terms never
overlap). The paper's stable scale is ``c = d_out^{1/4} / sqrt(gamma)`` (``gamma``, default 16), which keeps
the forward and backward magnitudes of ``B0 A0`` independent of the width.

Output at init: the base is rewritten to ``W_res = W - s B0 A0`` (``s = alpha / r``), so
``W_res + s B A = W`` exactly, as the paper does (PiSSA's LoraRewriteLayer machinery).

Rank limit: the init uses ``2r`` singular triplets, so ``r <= min(in, out) // 2``.
``niter`` (optional, as PiSSA's) computes the top ``2r`` triplets by a randomized SVD with
that many power iterations instead of the exact thin SVD (for large layers).

Not a deviation from the paper but from PEFT: PEFT's LoRA-GA also multiplies B by the
gradient's singular values and defaults to ``ArB2r``; the paper's init uses the singular
vectors only, which is what is implemented here. The gradient is the mean over the given
batches (the paper estimates it on a sampled set of batches the same way).
"""

from __future__ import annotations

from typing import Any

import torch

from rankwise.adapters.base import ADAPTERS, AdapterLayer
from rankwise.adapters.rewrite import LoraRewriteLayer, check_niter
from rankwise.calibration import LayerStatistics
from rankwise.linalg.svd import SVDFailure, truncated_svd


def gradient_svd(
    layer: AdapterLayer, stats: LayerStatistics | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of the layer's collected weight gradient (fp32, on the weight's device)."""
    gradient = stats.weight_gradient if stats is not None else None
    if gradient is None:
        raise layer.error("no weight gradient was collected for this layer; pass data with labels")
    if not torch.any(gradient != 0):
        raise layer.error("the loss does not depend on this layer's weight (its gradient is zero); exclude it")
    try:
        return truncated_svd(gradient.to(layer.base.weight.device), rank, niter=layer.options["niter"])
    except SVDFailure as exc:
        raise layer.error(f"cannot decompose the weight gradient ({exc}); check the data for inf/nan losses") from None


@ADAPTERS.register(
    "lora_ga",
    family="data_init",
    paper="LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
    arxiv="2407.05000",
    needs_data=True,
)
class LoraGaLayer(LoraRewriteLayer):
    """LoRA-GA: ``B0 = c U_{1:r}``, ``A0 = c V_{r+1:2r}^T`` of the full gradient; base ``W - s B0 A0``."""

    OPTIONS = {"direction": "A2rBr", "gamma": 16.0, "niter": None}
    statistics = ("weight_gradient",)

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        return min(in_features, out_features) // 2

    def __init__(self, base, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        if self.options["direction"] not in ("A2rBr", "ArB2r"):
            raise self.error(
                "direction must be 'A2rBr' (A from singular vectors r+1..2r, B from 1..r) or 'ArB2r', "
                f"got {self.options['direction']!r}"
            )
        gamma = self.options["gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise self.error(f"gamma must be a positive number, got {gamma!r}")
        check_niter(self)

    def initialize(self, stats: LayerStatistics | None = None) -> None:
        u, _, vh = gradient_svd(self, stats, 2 * self.rank)
        scale = self.out_features**0.25 / float(self.options["gamma"]) ** 0.5
        first, second = slice(0, self.rank), slice(self.rank, 2 * self.rank)
        b_index, a_index = (first, second) if self.options["direction"] == "A2rBr" else (second, first)
        self.start_from(scale * u[:, b_index], scale * vh[a_index])
