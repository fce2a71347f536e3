"""LoRA-GA: LoRA initialised so its first step follows the full fine-tuning gradient.

Wang, Yu & Li 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
arXiv 2407.05000.

The data gives ``G = mean_b dL_b/dW`` (``out x in``) of the frozen weight (statistic
``weight_gradient``). With ``W' = W_res + s B A`` one SGD step of size ``lr`` on ``A, B``
changes the weight by ``-lr s^2 (B B^T G + G A^T A) + O(lr^2)``. With ``G = U diag(S) V^T``
and two disjoint index sets ``I`` (for ``A``) and ``J`` (for ``B``) of size ``r`` among the
top ``2r`` triplets,

    A0 = c * V[:, I]^T,     B0 = c * U[:, J],     c = d_out^{1/4} / sqrt(gamma)

makes ``B0 B0^T G + G A0^T A0 = c^2 * (rank-2r truncated SVD of G)``: the first low-rank
update is the best rank-2r approximation of the full gradient step (the paper's gradient
approximation theorem; ``I`` and ``J`` are disjoint, so the two terms never overlap). The
stable scale ``c`` (``gamma``, default 16) keeps the forward and backward magnitudes of
``B0 A0`` independent of the width. ``direction`` picks the index sets:

- ``"ArB2r"`` (default): ``I = 1..r``, ``J = r+1..2r`` -- A from the TOP r right singular
  vectors, B from the next r left ones. This is the paper's Algorithm 1
  (``A_init = V[1:r]``, ``B_init = U[r+1:2r]``, both times ``d_out^{1/4}/sqrt(gamma)``) and
  the default of the authors' release (``direction: ArB2r`` in its init config) and of PEFT.
- ``"A2rBr"``: ``I = r+1..2r``, ``J = 1..r`` (the release's alternative).

The theorem holds for either choice; only which factor starts on the dominant directions
changes.

Output at init: the base is rewritten to ``W_res = W - s B0 A0`` (``s = alpha / r``), so
``W_res + s B A = W`` exactly, as the paper does (the LoRA-shaped rewrite of
:class:`~rankwise.adapters.rewrite.LoraRewriteLayer`).

``convention="peft"`` reproduces PEFT 0.21's ``init_lora_weights="lora_ga"`` instead, which
deviates from the paper: ``A0 = V[:, I]^T`` (unscaled) and ``B0 = c * U[:, J] diag(S_J)`` (B
also carries the gradient's singular values). With it, the same gradients give PEFT's
initial ``A``, ``B`` and residual weight (PEFT uses a randomized SVD with ``q = min(4r,
min(out, in))`` and 4 power iterations, which is exact when ``4r >= min(out, in)``).

Rank limit: the init uses ``2r`` singular triplets, so ``r <= min(in, out) // 2``.
``niter`` (optional, as PiSSA's) computes the top ``2r`` triplets by a randomized SVD with
that many power iterations instead of the exact thin SVD (for large layers). The SVDs of
same-shape layers run as one batched call (:class:`~rankwise.adapters.gradient_family.GradientSVDInit`),
on the weights' device, in fp32; ``init_report(model)["residual_error"]`` gives each layer's
``||W - s B0 A0||_F / ||W||_F``. The gradient
is the mean over the given batches (the paper estimates it on a sampled set of batches the
same way).
"""

from __future__ import annotations

from rankwise.adapters.base import ADAPTERS, FULL_PRECISION
from rankwise.adapters.gradient_family import GradientSVDInit
from rankwise.adapters.rewrite import LoraRewriteLayer
from rankwise.calibration import LayerStatistics
from rankwise.common_options import NITER
from rankwise.options import Option


@ADAPTERS.register(
    "lora_ga",
    family="data_init",
    paper="LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
    arxiv="2407.05000",
    supports=FULL_PRECISION,
)
class LoraGaLayer(GradientSVDInit, LoraRewriteLayer):
    """LoRA-GA: ``A0 = c V_{1:r}^T``, ``B0 = c U_{r+1:2r}`` of the full gradient; base ``W - s B0 A0``."""

    OPTIONS = {
        "direction": Option("ArB2r", str, choices=("ArB2r", "A2rBr"),
                            help="ArB2r: A from singular vectors 1..r, B from r+1..2r (the paper); A2rBr: swapped"),
        "gamma": Option(16.0, float, low=0, low_open=True, help="stable scale c = d_out^(1/4) / sqrt(gamma)"),
        "convention": Option("paper", str, choices=("paper", "peft"),
                             help="paper: A0 = c V^T, B0 = c U; peft: PEFT 0.21's A0 = V^T, B0 = c U diag(S)"),
        "niter": NITER,
    }
    statistics = ("weight_gradient",)

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        return min(in_features, out_features) // 2

    def svd_rank(self) -> int:
        return 2 * self.rank

    def initialize(self, stats: LayerStatistics | None = None) -> None:
        u, s, vh = self.gradient_triplets(stats)
        c = self.out_features**0.25 / self.options["gamma"] ** 0.5
        top, next_r = slice(0, self.rank), slice(self.rank, 2 * self.rank)
        a_index, b_index = (top, next_r) if self.options["direction"] == "ArB2r" else (next_r, top)
        if self.options["convention"] == "paper":
            self.start_from(c * u[:, b_index], c * vh[a_index])
        else:
            self.start_from(c * u[:, b_index] * s[b_index], vh[a_index])
