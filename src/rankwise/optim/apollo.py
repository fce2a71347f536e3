"""APOLLO and APOLLO-Mini: Adam's learning-rate scaling estimated in a random low-rank space.

Paper: Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee, "APOLLO: SGD-like Memory,
AdamW-level Performance", arXiv 2412.05270 (Algorithm 1). ``apollo`` is
:class:`APOLLOAdamW`, ``apollo_mini`` is :class:`APOLLOMiniAdamW` (rank 1, tensor-wise
scaling, scale 128).

For a weight ``W`` (``m x n``) with gradient ``G_t``, rank ``r``, refresh gap ``T``, on the
side chosen by ``proj_type`` (``std``: the shorter side; written here for ``m <= n``)::

    every T steps: P ~ N(0, 1/r)^{r x m}, drawn from seed(parameter, step)   (proj="random")
                   or P = U[:, :r]^T of svd(G_t)                                (proj="svd")
    R_t = P G_t                                          (r x n, the only thing Adam sees)
    M_t = b1 M + (1 - b1) R_t ;  V_t = b2 V + (1 - b2) R_t^2
    Rt_t = M_t / (sqrt(V_t) + eps)                       (bias correction folded into the step size)
    s_j = ||Rt_t[:, j]|| / (||R_t[:, j]|| + 1e-8)        (scale_type="channel": per column of G)
    s   = ||Rt_t|| / (||R_t|| + 1e-8)                    (scale_type="tensor")
    U_t = G_t diag(s)                                    (the RAW gradient, not projected back)
    norm-growth limiter (Fira, arXiv 2410.01623), gamma = 1.01:
        if ||U_t|| > gamma ||U_{t-1}||:  U_t <- U_t * gamma ||U_{t-1}|| / ||U_t||
    W -= lr * sqrt(1 - b2^t) / (1 - b1^t) * sqrt(scale) * U_t ;  W -= lr * weight_decay * W

``sqrt(scale)`` is the paper's gradient scale factor alpha (APOLLO-Mini uses alpha =
sqrt(128) to make up for the norm lost by a rank-1 projection); ``scale`` holds alpha^2 as in
the apollo-torch package. The channel-wise factor is computed along the side that is not
projected (the columns of ``G`` for a left projection, its rows for a right one).

The random ``P`` is never stored: the state holds an integer ``proj_seed`` (derived from the
per-parameter seed and the step of the refresh) and ``P`` is regenerated from it at every step
on the parameter's device, so a resumed run draws the same matrices. State per ``m x n``
weight (``m <= n``): moments ``2 r n`` plus one float (the limiter's previous norm); the SVD
variant adds the stored basis ``m r``.

Deviations from the paper / the reference package (apollo-torch 1.0.3):
- The reference stores ``P`` in optimizer state inside a Python object (so its checkpoints
  do not load with ``torch.load(weights_only=True)``) and draws it from its own seed chain;
  rankwise regenerates it from a stored integer, so the random variant cannot match the
  reference's matrices (the SVD variant matches its trajectory).
- The reference picks the channel side from the shape alone, which breaks for
  ``proj_type`` other than ``std``; rankwise uses the unprojected side, and refuses
  ``scale_type="channel"`` with ``proj_type="full"`` (both sides projected: no channel left).
- ``proj_type="full"`` with ``proj="random"`` draws an independent Gaussian on each side
  (the reference raises NotImplementedError).
- Extra keys: ``moment_policy`` (keep / reset / rotate; default ``keep``, the paper's and the
  reference's behaviour; ``rotate`` maps the moments by the least-squares coordinate change
  between the two Gaussian sketches), ``bias_correction``, ``norm_growth_limiter`` (None =
  follow the constructor flag ``disable_nl`` of the reference) and ``seed``. The reference's
  constructor flags ``scale_front`` (apply ``sqrt(scale)`` before the limiter, which changes
  only the 1e-8 guard) and ``disable_nl`` are optimizer-wide hyperparameters.
- Runs in the parameters' dtype (fp64 included: the limiter's norm is float32, or float64 for
  float64 weights).
- Non-finite gradients and failed SVDs never reach the weights (see :mod:`rankwise.optim.lowrank`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from rankwise.errors import RankwiseError
from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import ADAM, SEED, SUBSPACE, with_defaults
from rankwise.optim.pieces import LowRankStep, Projector, UpdateRule
from rankwise.optim.projectors import REFRESH, GaussianProjector, SVDProjector
from rankwise.optim.rules import limit_norm_growth
from rankwise.options import Option

PROJECTIONS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
NORM_GUARD = 1e-8  # keeps the scaling ratios finite when a norm vanishes


class ApolloScaling(UpdateRule):
    """APOLLO's update: the raw gradient times the channel- or tensor-wise factor, limited, times ``sqrt(scale)``.

    One full-size tensor is allocated (``G * s``); the limiter and ``sqrt(scale)`` act on it in place.
    """

    def combine(self, step: LowRankStep) -> torch.Tensor:
        group = step.group
        if group["scale_type"] == "channel":
            dim = 0 if step.basis.left is not None else 1  # reduce over the projected side
            adapted = torch.linalg.vector_norm(step.direction, dim=dim, keepdim=True)
            raw = torch.linalg.vector_norm(step.low_grad, dim=dim, keepdim=True)
        else:
            adapted, raw = torch.linalg.vector_norm(step.direction), torch.linalg.vector_norm(step.low_grad)
        update = step.grad * (adapted / (raw + NORM_GUARD))
        alpha = math.sqrt(group["scale"])
        if group["scale_front"] and alpha != 1.0:
            update.mul_(alpha)
        limiter = group["norm_growth_limiter"]
        if limiter if limiter is not None else not group["disable_nl"]:
            limit_norm_growth(update, step.state, "limiter_norm")
        if not group["scale_front"] and alpha != 1.0:
            update.mul_(alpha)
        return update


@OPTIMIZERS.register(
    "apollo",
    family="random_projection",
    paper="APOLLO: SGD-like Memory, AdamW-level Performance",
    arxiv="2412.05270",
    supports=("layerwise", "ddp", "fsdp2"),
)
class APOLLOAdamW(LowRankAdamW):
    """Drop-in for ``apollo_torch.APOLLOAdamW``: a group is handled by APOLLO iff it has ``rank``.

    ``APOLLOAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
    correct_bias=True, scale_front=False, disable_nl=False)``; group keys ``rank``,
    ``proj`` (random | svd), ``scale_type`` (channel | tensor), ``scale``,
    ``update_proj_gap``, ``proj_type``, plus ``moment_policy``, ``bias_correction``,
    ``norm_growth_limiter`` and ``seed``.
    """

    update_rule = ApolloScaling()
    HYPERPARAMETERS = {
        **ADAM,
        "scale_front": Option(False, bool, help="apply sqrt(scale) before the norm-growth limiter (apollo-torch flag)"),
        "disable_nl": Option(False, bool, help="switch the norm-growth limiter off by default (apollo-torch flag)"),
    }
    OPTIONS = {
        **with_defaults(SUBSPACE, scale=1.0),
        **SEED,
        **REFRESH,  # used by proj="svd"
        "proj": Option("random", str, choices=PROJECTIONS, help="random: seeded Gaussian sketch; svd: GaLore's basis"),
        "scale_type": Option(
            "channel", str, choices=SCALE_TYPES, help="one scaling factor per channel (column / row) or per tensor"
        ),
        "norm_growth_limiter": Option(
            None, bool, nullable=True, help="Fira's limiter on the update; None = on unless disable_nl"
        ),
    }
    _svd_projector = SVDProjector()

    def projector_for(self, group: Mapping[str, Any]) -> Projector:
        if group["proj"] == "svd":
            return self._svd_projector
        return GaussianProjector(group["rank"], group["proj_type"])

    def check_group(self, group: Mapping[str, Any], params: Sequence[torch.Tensor]) -> None:
        super().check_group(group, params)
        if group["scale_type"] == "channel" and group["proj_type"] == "full":
            raise RankwiseError(
                "scale_type='channel' needs one unprojected side, but proj_type='full' projects both; "
                "use scale_type='tensor' or another proj_type"
            )


@OPTIMIZERS.register(
    "apollo_mini",
    family="random_projection",
    paper="APOLLO: SGD-like Memory, AdamW-level Performance",
    arxiv="2412.05270",
    supports=("layerwise", "ddp", "fsdp2"),
)
class APOLLOMiniAdamW(APOLLOAdamW):
    """APOLLO-Mini: :class:`APOLLOAdamW` with rank 1, tensor-wise scaling and scale 128 by default."""

    OPTIONS = {
        **with_defaults(SUBSPACE, rank=1, scale=128.0),
        "scale_type": Option("tensor", str, choices=SCALE_TYPES, help="one scaling factor per channel or per tensor"),
    }
