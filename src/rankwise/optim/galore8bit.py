"""GaLore with 8-bit blockwise-quantised Adam moments (``galore8bit``, :class:`GaLoreAdamW8bit`).

Papers: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507 (the projection, Algorithm 2, and its 8-bit variant), with
the moments stored as in Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", arXiv 2110.02861.

The projection is GaLore's (see :mod:`rankwise.optim.galore`); only the inner Adam differs:
:class:`rankwise.optim.inner.QuantizedAdamMoments`. Each step::

    M = deq(M_codes, M_absmax) ;  V = deq(S_codes, S_absmax)^2        (float)
    M = b1 M + (1 - b1) R_t ;  V = b2 V + (1 - b2) R_t^2
    N_t = M / (sqrt(V) + eps)                   (from the float moments, before requantising)
    M_codes, M_absmax = q(M) ;  S_codes, S_absmax = q(sqrt(V))
    W -= lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * (P N_t  or  N_t Q^T)

so the first step equals fp32 GaLore's exactly and later steps differ by the moments'
quantisation error (at most 0.7 % of a block's absmax; ~2 significant digits per decade).
With ``sqrt(V)`` on the map the per-step direction error on the tiny LLaMA's projected
gradients is ~2-3 %, as with bitsandbytes' maps. Like bitsandbytes, moments of tensors with
fewer than ``min_8bit_size`` (4096) numbers stay float32; unprojected parameters run the
same 8-bit Adam on their full gradient.

State per ``m x n`` weight (``std``, ``N = r max(m, n) >= min_8bit_size``): ``2 N`` bytes of
codes + ``8 ceil(N / 256)`` bytes of absmax + the fp32 basis ``4 r min(m, n)`` -- the
moments take ~4x less than GaLoreAdamW's. The two codebooks (1 KiB each per device) are
constants of the scheme, outside the optimizer state.

Deviations from the reference (galore-torch 1.0's ``GaLoreAdamW8bit`` on bitsandbytes):
- The codebooks follow the paper's dynamic-tree description (our own construction,
  :mod:`rankwise.linalg.quant`); bitsandbytes' tables differ in the exact code values, and
  the second moment is stored as its square root, so trajectories agree to the
  quantisation error, not bit for bit.
- Adam's eps is added to ``sqrt(V)`` (GaLore / HF form) rather than to the bias-corrected
  ``sqrt(V_hat)`` (bitsandbytes); the difference is ``O(eps)``.
- Weight decay is decoupled and applied after the step for every group (bitsandbytes
  applies it before the update for unprojected parameters); no percentile clipping.
- Runs on CPU and CUDA in plain PyTorch; all state is tensors (``weights_only`` loads).
- ``moment_policy`` (keep / reset / rotate; default keep, as GaLore): ``rotate``
  dequantises, changes coordinates and requantises; ``bias_correction`` as GaLore's.
"""

from __future__ import annotations

from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.inner import ADAM_8BIT, QuantizedAdamMoments
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import SUBSPACE
from rankwise.optim.projectors import REFRESH, SVDProjector
from rankwise.optim.rules import DropResidual


@OPTIMIZERS.register(
    "galore8bit",
    family="galore",
    paper="GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    arxiv="2403.03507",
    supports=("layerwise", "ddp", "fsdp2"),
)
class GaLoreAdamW8bit(LowRankAdamW):
    """Drop-in for ``galore_torch.GaLoreAdamW8bit``: a group is projected iff it has ``rank``.

    ``GaLoreAdamW8bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    min_8bit_size=4096)`` -- bitsandbytes' AdamW8bit defaults. ``min_8bit_size`` is an
    optimizer-wide hyperparameter: every group takes it unless it sets its own.
    """

    projector = SVDProjector()
    inner = QuantizedAdamMoments()
    update_rule = DropResidual()
    HYPERPARAMETERS = ADAM_8BIT
    OPTIONS = {**SUBSPACE, **REFRESH}
