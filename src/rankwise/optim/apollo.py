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
  between the two Gaussian sketches), ``norm_growth_limiter`` (the reference's constructor
  flag ``disable_nl``, also accepted) and ``scale_front`` (the reference's constructor flag:
  apply ``sqrt(scale)`` before the limiter, which changes only the 1e-8 guard), ``seed``.
- Non-finite gradients and failed SVDs never reach the weights (see :mod:`rankwise.optim.core`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from rankwise.errors import RankwiseError
from rankwise.linalg.projections import Basis, projection_sides, seeded_gaussian
from rankwise.optim.core import (
    OPTIMIZERS,
    LowRankAdamW,
    LowRankStep,
    Projector,
    ResidualRule,
    SVDProjector,
)

PROJECTIONS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
GROWTH_LIMIT = 1.01  # Fira's gamma: the update norm may grow by at most 1% per step
NORM_GUARD = 1e-8  # keeps the ratios finite when a norm vanishes

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, salt: int) -> int:
    """A 63-bit seed from ``(seed, salt)`` by the SplitMix64 finaliser (distinct inputs -> unrelated seeds)."""
    z = (seed * 0x9E3779B97F4A7C15 + salt + 0x632BE59BD9B4E8B5) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class GaussianBasis(Basis):
    """A basis whose factors are Gaussian sketches (not orthonormal).

    Switching keeps the meaning of the coordinates in the least-squares sense: ``low_old =
    L_old^T G`` determines ``G``'s part in span(L_old) as ``L_old (L_old^T L_old)^-1 low_old``,
    whose new coordinates are ``low_new = L_new^T L_old (L_old^T L_old)^-1 low_old`` (and
    symmetrically on the right). This reduces to :meth:`Basis.transition` for orthonormal factors.
    """

    def transition(self, new: Basis) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if (self.left is None) != (new.left is None) or (self.right is None) != (new.right is None):
            raise ValueError("cannot switch between bases projecting on different sides")
        c_left = c_right = None
        if self.left is not None:
            gram = (self.left.T @ self.left).float()
            c_left = torch.linalg.solve(gram, (self.left.T @ new.left).float()).T.to(self.left.dtype)
        if self.right is not None:
            gram = (self.right.T @ self.right).float()
            c_right = torch.linalg.solve(gram, (self.right.T @ new.right).float()).to(self.right.dtype)
        return c_left, c_right


@dataclass(frozen=True)
class GaussianProjector(Projector):
    """``P ~ N(0, 1/rank)`` regenerated from ``state["proj_seed"]``; only the seed is stored.

    At a refresh ``proj_seed = mix_seed(parameter seed, step)``; the left factor (``m x r``)
    is drawn from ``proj_seed``, the right one (``n x r``) from ``mix_seed(proj_seed, 1)``.
    """

    rank: int
    proj_type: str

    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        state["proj_seed"] = mix_seed(seed, state["step"])

    def has_basis(self, state: Mapping[str, Any]) -> bool:
        return "proj_seed" in state

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> GaussianBasis:
        use_left, use_right = projection_sides(param.shape, self.proj_type)
        seed, std = state["proj_seed"], 1.0 / math.sqrt(self.rank)
        options = {"std": std, "device": param.device, "dtype": param.dtype}
        left = seeded_gaussian(param.shape[0], self.rank, seed, **options) if use_left else None
        right = seeded_gaussian(param.shape[1], self.rank, mix_seed(seed, 1), **options) if use_right else None
        return GaussianBasis(left, right)


def limit_norm_growth(update: torch.Tensor, state: dict, key: str = "limiter_norm") -> torch.Tensor:
    """Fira's norm-growth limiter, in place: ``||U_t|| <= GROWTH_LIMIT * ||U_{t-1}||``; returns ``update``.

    ``state[key]`` holds the previous (limited) norm as a 0-d float32 tensor; no host sync.
    """
    norm = torch.linalg.vector_norm(update, dtype=torch.float32)
    if key not in state:
        state[key] = norm
        return update
    limiter = torch.clamp(norm / (state[key] + NORM_GUARD), min=GROWTH_LIMIT) / GROWTH_LIMIT
    state[key] = norm / limiter
    return update.div_(limiter)


class ApolloScaling(ResidualRule):
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
        if group["norm_growth_limiter"]:
            limit_norm_growth(update, step.state)
        if not group["scale_front"] and alpha != 1.0:
            update.mul_(alpha)
        return update


class APOLLOAdamW(LowRankAdamW):
    """Drop-in for ``apollo_torch.APOLLOAdamW``: a group is handled by APOLLO iff it has ``rank``.

    ``APOLLOAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
    correct_bias=True, scale_front=False, disable_nl=False)``; group keys ``rank``,
    ``proj`` (random | svd), ``scale_type`` (channel | tensor), ``scale``,
    ``update_proj_gap``, ``proj_type``, plus ``moment_policy``, ``norm_growth_limiter``,
    ``scale_front`` and ``seed``. The constructor flags set the defaults of the last two keys
    for groups that do not give them.
    """

    residual = ApolloScaling()
    method_defaults = {
        "rank": 128,
        "proj": "random",
        "scale_type": "channel",
        "scale": 1.0,
        "update_proj_gap": 200,
        "proj_type": "std",
        "moment_policy": "keep",
        "norm_growth_limiter": True,
        "scale_front": False,
        "seed": 0,
    }
    _svd_projector = SVDProjector()

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        no_deprecation_warning: bool = True,
        *,
        param_names: Mapping[int, str] | None = None,
    ) -> None:
        if scale_front or disable_nl:
            flags = {"scale_front": bool(scale_front), "norm_growth_limiter": not disable_nl}
            self.method_defaults = {**type(self).method_defaults, **flags}
        super().__init__(
            params, lr, betas, eps, weight_decay, correct_bias, no_deprecation_warning, param_names=param_names
        )

    def projector_for(self, group: Mapping[str, Any]) -> Projector:
        if group["proj"] == "svd":
            return self._svd_projector
        return GaussianProjector(group["rank"], group["proj_type"])

    def validate_projected_group(self, group: Mapping[str, Any], params: Sequence[torch.Tensor]) -> None:
        super().validate_projected_group(group, params)
        if group["proj"] not in PROJECTIONS:
            raise RankwiseError(f"unknown proj {group['proj']!r}; known: {', '.join(PROJECTIONS)}")
        if group["scale_type"] not in SCALE_TYPES:
            raise RankwiseError(f"unknown scale_type {group['scale_type']!r}; known: {', '.join(SCALE_TYPES)}")
        for key in ("norm_growth_limiter", "scale_front"):
            if not isinstance(group[key], bool):
                raise RankwiseError(f"{key} must be True or False, got {group[key]!r}")
        if not isinstance(group["seed"], int) or isinstance(group["seed"], bool):
            raise RankwiseError(f"seed must be an integer, got {group['seed']!r}")
        if group["scale_type"] == "channel" and group["proj_type"] == "full":
            raise RankwiseError(
                "scale_type='channel' needs one unprojected side, but proj_type='full' projects both; "
                "use scale_type='tensor' or another proj_type"
            )


class APOLLOMiniAdamW(APOLLOAdamW):
    """APOLLO-Mini: :class:`APOLLOAdamW` with rank 1, tensor-wise scaling and scale 128 by default."""

    method_defaults = {**APOLLOAdamW.method_defaults, "rank": 1, "scale_type": "tensor", "scale": 128.0}


OPTIMIZERS.register(
    "apollo",
    family="random_projection",
    paper="APOLLO: SGD-like Memory, AdamW-level Performance",
    arxiv="2412.05270",
)(APOLLOAdamW.from_parameters)
OPTIMIZERS.register(
    "apollo_mini",
    family="random_projection",
    paper="APOLLO: SGD-like Memory, AdamW-level Performance",
    arxiv="2412.05270",
)(APOLLOMiniAdamW.from_parameters)
