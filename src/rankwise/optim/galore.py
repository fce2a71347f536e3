"""GaLore: gradient low-rank projection with Adam (``galore``, :class:`GaLoreAdamW`).

Paper: Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore: Memory-Efficient LLM Training
by Gradient Low-Rank Projection", arXiv 2403.03507 (Algorithm 2).

For a weight ``W`` (``m x n``) with gradient ``G_t``, rank ``r``, refresh gap ``T``, scale ``alpha``::

    every T steps (t = 0, T, 2T, ...):  U, S, V^T = svd(G_t)  (float32)
        P = U[:, :r]  (m x r, std when m < n)      or   Q = V[:, :r]  (n x r, std when m >= n)
    R_t = P^T G_t   (r x n)                         or   R_t = G_t Q  (m x r)
    M_t = b1 M + (1 - b1) R_t ;  V_t = b2 V + (1 - b2) R_t^2
    N_t = M_t / (sqrt(V_t) + eps)
    W  -= lr * sqrt(1 - b2^t) / (1 - b1^t) * alpha * (P N_t   or   N_t Q^T)
    W  -= lr * weight_decay * W

State per ``m x n`` weight: ``exp_avg`` and ``exp_avg_sq`` of the projected shape plus the
basis: ``2 r max(m, n) + r min(m, n)`` numbers under ``std``. Groups without ``rank`` run
the same AdamW on the full gradient. The group keys (``rank``, ``update_proj_gap``,
``scale``, ``proj_type`` in std / reverse_std / left / right / full) and the constructor
signature are galore-torch 1.0's, so switching is a change of import.

Deviations from the reference package (galore-torch 1.0):
- ``rank > min(m, n)`` raises RankwiseError naming the layer (the reference silently uses
  ``min(m, n)``), and bad keys raise at construction instead of at the first step.
- A projected group missing ``update_proj_gap`` / ``scale`` / ``proj_type`` takes the
  paper's defaults (200 / 0.25 / std) instead of failing with KeyError.
- The basis is a tensor in ``optimizer.state`` (``proj_left`` / ``proj_right``), not a
  Python object, so checkpoints load with ``torch.load(weights_only=True)``.
- Non-finite gradients skip the parameter's step and a failed SVD keeps the previous
  subspace (the reference writes NaN into the weights).
- Extra keys ``moment_policy`` (keep / reset / rotate) for the moments at a subspace
  switch -- the default ``keep`` is the paper's (and the reference's) behaviour -- and
  ``bias_correction`` (``global``, the paper's; ``per_coordinate`` corrects coordinates new
  to the subspace after a ``rotate`` switch like a fresh start, see :mod:`rankwise.optim.inner`).
- Extra keys ``refresh`` (``svd``, the paper's exact SVD; ``randomized``; ``warm``),
  ``refresh_niter``, ``refresh_oversample`` (:data:`rankwise.optim.projectors.REFRESH`,
  shared by every SVD-based projector); the due weights of a group are decomposed in one
  batched call per shape.
"""

from __future__ import annotations

from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import SUBSPACE
from rankwise.optim.projectors import REFRESH, SVDProjector
from rankwise.optim.rules import DropResidual


@OPTIMIZERS.register(
    "galore",
    family="galore",
    paper="GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    arxiv="2403.03507",
    supports=("layerwise", "ddp", "fsdp2"),
)
class GaLoreAdamW(LowRankAdamW):
    """Drop-in for ``galore_torch.GaLoreAdamW``: a group is projected iff it has ``rank``.

    ``GaLoreAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True)``
    """

    projector = SVDProjector()
    update_rule = DropResidual()
    OPTIONS = {**SUBSPACE, **REFRESH}
