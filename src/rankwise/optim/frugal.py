"""FRUGAL: full-rank updates by gradient splitting (``frugal``, :class:`FrugalAdamW`, alias :data:`FRUGAL`).

Paper: Zmushko, Beznosikov, Takac, Horvath, "FRUGAL: Memory-Efficient Optimization by
Reducing State Overhead for Scalable Training", ICML 2025, arXiv 2411.07837 (Algorithm 1,
FRUGAL(AdamW, signSGD)).

Every ``T`` steps a state-full subspace of density ``rho`` is chosen for each weight ``W``
(``m x n``); AdamW runs on the gradient's component in it, a state-free rule on the rest::

    every T steps:  choose the subspace (key ``proj``), reset the Adam statistics (``moment_policy="reset"``)
    R      = P(G)                                          state-full part, in subspace coordinates
    M = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R^2       (moments of R only)
    G_free = G - P^-1(R)                                   the rest of the gradient
    W     -= scale * ( lr sqrt(1 - b2^t) / (1 - b1^t) * P^-1(M / (sqrt(V) + eps))
                      + lr * state_free_lr_scale * S(G_free) )
    W     -= lr * weight_decay * W
    S = sign (state_free="sign", the paper's default), identity ("sgd") or zero ("none").

Subspaces (``proj``):
- ``svd``: top-``r`` singular vectors of ``G`` on the side chosen by ``proj_type`` (GaLore's
  orientation keys), ``r = round(rho * side)``; ``P(G) = L^T G R``, basis stored.
- ``random``: a random matrix with orthonormal columns (QR of a Gaussian) of the same size,
  regenerated at every step from an integer seed stored in the state.
- ``coordinates``: RandK, ``round(rho m n)`` random entries of ``W`` (the indices are
  regenerated from a stored seed, never stored); ``P(G)`` is the vector of those entries.
- ``blocks`` (default: the authors' code runs ``frugal`` as this blockwise variant): whole weights are state-full
  or state-free; every ``T`` steps ``round(rho N)`` of the ``N`` projected weights become
  state-full, by ``block_order`` ``random`` (a seeded permutation of the group, the
  default), ``ascending`` or ``descending`` (cycling through the group in order).
A ``rank`` (int) may replace ``rho`` for ``svd`` / ``random``.

State per ``m x n`` weight: ``2 r max(m, n)`` moments (+ ``r min(m, n)`` basis for ``svd``)
under ``std``; ``2 round(rho m n)`` for ``coordinates``; ``2 m n`` for a state-full block,
nothing for a state-free one. Random choices come from ``mix_seed(seed of the parameter or
group, step of the refresh)``, so a resumed run makes the same choices.

Keys and the authors' released code: ``density`` (rho),
``update_proj_gap`` (their ``update_gap``), ``scale`` (``proj_params_lr_scale``),
``state_free`` sign / sgd / none (``inactive_update_rule`` sign_sgd / sgd / no),
``state_free_lr_scale`` (``inactive_lr_scale``), ``proj`` (their optimizer class and
``proj_type``), ``proj_type`` (their ``proj_side``), ``block_order``, ``moment_policy``
(their ``reset_statistics``: True = reset, False = keep), ``seed``.

Defaults are the authors' released code's (``BlockAdamW`` / ``GaloreAdamW`` of the FRUGAL
repository): AdamW with ``eps`` 1e-8 and ``weight_decay`` 0.01 (HF AdamW form: ``eps`` on the
uncorrected ``sqrt(V)``), density 0.25, gap 200, signSGD on the state-free part, statistics
reset at each switch, blocks in random order.

Deviations:
- Weight decay is applied after the update (the authors' code decays before it), to every
  weight of the group, state-full or state-free.
- ``moment_policy="rotate"`` is offered (the paper resets or keeps): bases rotate as
  GaLore's; ``coordinates`` carry the moments of entries selected again to their new
  position, new entries start at zero; ``blocks`` keep the moments of a weight that stays
  state-full. A weight that switches between state-full and state-free always loses its
  moments (it has none while state-free).
- Counts use ``round`` everywhere (the authors' RandK truncates); ``rho = 0`` is allowed for
  ``blocks`` only (pure signSGD on the group); a layer whose state-full size rounds to 0
  under another ``proj`` raises an error naming it.
- Not offered: the authors' ``randperm`` projection (a random subset of rows / columns as a
  basis), their row / column variants of RandK and the ``mirror`` block order.
- The block choice is made per weight from its own step counter (so layerwise mode can
  step weights one at a time); a weight that misses steps (no gradient) may fall out of
  phase with the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from rankwise.errors import RankwiseError
from rankwise.linalg.projections import Basis, projection_sides, seeded_gaussian
from rankwise.linalg.svd import orthonormal_basis
from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.inner import WEIGHT_KEYS, bias_corrections
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import ADAM, SEED, SUBSPACE, with_defaults
from rankwise.optim.pieces import LowRankStep, Projector, UpdateRule
from rankwise.optim.projectors import REFRESH, SeededProjector, SVDProjector, mix_seed
from rankwise.options import Option

PROJECTIONS = ("blocks", "svd", "random", "coordinates")
STATE_FREE_RULES = ("sign", "sgd", "none")
BLOCK_ORDERS = ("random", "ascending", "descending")


def subspace_rank(shape: Sequence[int], group: Mapping[str, Any]) -> int:
    """State-full rank of an ``m x n`` weight for ``svd`` / ``random``: ``rank`` or ``round(rho * side)``."""
    if group["rank"] is not None:
        return group["rank"]
    use_left, use_right = projection_sides(tuple(shape), group["proj_type"])
    side = min(shape) if use_left and use_right else (shape[0] if use_left else shape[1])
    return round(group["density"] * side)


def coordinate_count(shape: Sequence[int], density: float) -> int:
    """RandK's ``k = round(rho m n)``."""
    return round(density * shape[0] * shape[1])


def active_block_count(size: int, density: float) -> int:
    """State-full weights among ``size``: ``round(rho N)``."""
    return round(density * size)


def active_blocks(size: int, count: int, order: str, refresh: int, seed: int) -> set[int]:
    """Indices (in the group) of the ``count`` state-full weights after refresh number ``refresh``."""
    if order == "random":
        generator = torch.Generator().manual_seed(mix_seed(seed, refresh))
        return set(torch.randperm(size, generator=generator)[:count].tolist())
    if order == "ascending":
        return {(refresh * count + i) % size for i in range(count)}
    return {(size - 1 - refresh * count - i) % size for i in range(count)}


# --------------------------------------------------------------------------- subspaces


class RankedSVDProjector(SVDProjector):
    """GaLore's SVD projector at FRUGAL's rank ``round(rho * side)``."""

    def rank_for(self, shape: Sequence[int], group: Mapping[str, Any]) -> int:
        return subspace_rank(shape, group)


class RandomOrthogonalProjector(SeededProjector):
    """Random orthonormal columns (QR of a seeded Gaussian), regenerated from ``state["proj_seed"]``."""

    def __init__(self, group: Mapping[str, Any]) -> None:
        self.group = group

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> Basis:
        use_left, use_right = projection_sides(param.shape, self.group["proj_type"])
        rank, seed = subspace_rank(param.shape, self.group), state["proj_seed"]

        work = torch.promote_types(param.dtype, torch.float32)  # drawn in float32, orthonormalised in >= float32

        def orthonormal(rows: int, salt: int) -> torch.Tensor:
            gaussian = seeded_gaussian(rows, rank, mix_seed(seed, salt), device=param.device)
            return orthonormal_basis(gaussian.to(work)).to(param.dtype)

        left = orthonormal(param.shape[0], 0) if use_left else None
        return Basis(left, orthonormal(param.shape[1], 1) if use_right else None)


@dataclass(frozen=True)
class CoordinateBasis(Basis):
    """RandK: ``P(G)`` is the vector of ``G``'s entries at the sorted flat ``indices``."""

    indices: torch.Tensor | None = None
    shape: tuple[int, ...] = ()

    def project(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(-1).index_select(0, self.indices)

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        full = low.new_zeros(self.shape[0] * self.shape[1])
        return full.index_copy_(0, self.indices, low).view(self.shape)


class CoordinateProjector(SeededProjector):
    """``round(rho m n)`` random entries, drawn (and redrawn at every step) from ``state["proj_seed"]``."""

    def __init__(self, group: Mapping[str, Any]) -> None:
        self.group = group

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> CoordinateBasis:
        size = param.shape[0] * param.shape[1]
        generator = torch.Generator(device=param.device).manual_seed(state["proj_seed"])
        chosen = torch.randperm(size, generator=generator, device=param.device)
        indices = chosen[: coordinate_count(param.shape, self.group["density"])].sort().values
        return CoordinateBasis(None, None, indices, tuple(param.shape))


@dataclass(frozen=True)
class BlockBasis(Basis):
    """A whole weight: ``P(G) = G`` when state-full, an empty vector when state-free."""

    active: bool = False
    shape: tuple[int, ...] = ()

    def project(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix if self.active else matrix.new_zeros(0)

    def project_back(self, low: torch.Tensor) -> torch.Tensor:
        return low if self.active else low.new_zeros(self.shape)


class BlockProjector(Projector):
    """Chooses the state-full weights of a group; ``state["proj_active"]`` says whether this one is.

    ``members()`` returns the per-parameter seeds of the group's weights in group order (asked
    only at a refresh): a weight finds its index in the group by its seed.
    """

    def __init__(self, members: Callable[[], Sequence[int]]) -> None:
        self.members = members

    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        members = self.members()
        count = active_block_count(len(members), group["density"])
        refresh = state["step"] // group["update_proj_gap"]
        chosen = active_blocks(len(members), count, group["block_order"], refresh, group["seed"])
        state["proj_active"] = members.index(seed) in chosen

    def has_basis(self, state: Mapping[str, Any]) -> bool:
        return "proj_active" in state

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> BlockBasis:
        return BlockBasis(None, None, state["proj_active"], tuple(param.shape))


# --------------------------------------------------------------------------- update rule


class StateFreeResidual(UpdateRule):
    """``scale * (P^-1(direction) + (lr * state_free_lr_scale / step_size) * S(G - P^-1(R)))``.

    The optimizer applies the result times ``step_size`` (Adam's bias-corrected rate), so the
    state-free part is applied at ``scale * lr * state_free_lr_scale`` with no bias correction.
    """

    def combine(self, step: LowRankStep) -> torch.Tensor:
        group = step.group
        update = step.project_back(step.direction)
        if group["state_free"] != "none" and step.step_size > 0:
            free = step.grad - step.project_back(step.low_grad)
            if group["state_free"] == "sign":
                free = free.sign_()
            update = update.add(free, alpha=group["lr"] * group["state_free_lr_scale"] / step.step_size)
        return update * group["scale"]


@OPTIMIZERS.register(
    "frugal",
    family="split",
    paper="FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training",
    arxiv="2411.07837",
    supports=("layerwise", "ddp", "fsdp2"),
)
class FrugalAdamW(LowRankAdamW):
    """FRUGAL(AdamW, signSGD): a group is handled by FRUGAL iff it has ``rank`` (may be ``None``).

    ``FrugalAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, correct_bias=True)``;
    group keys ``density``, ``proj`` (blocks / svd / random / coordinates), ``update_proj_gap``,
    ``state_free`` (sign / sgd / none), ``state_free_lr_scale``, ``scale``, ``rank``,
    ``proj_type``, ``block_order``, ``moment_policy`` (default ``reset``), ``bias_correction``, ``seed``.
    """

    update_rule = StateFreeResidual()
    HYPERPARAMETERS = with_defaults(ADAM, eps=1e-8, weight_decay=0.01)
    OPTIONS = {
        **with_defaults(SUBSPACE, scale=1.0, moment_policy="reset"),
        **SEED,
        **REFRESH,  # used by proj="svd"
        "rank": Option(None, int, low=1, nullable=True,
                       help="state-full rank for proj svd / random; None = round(density * projected side)"),
        "density": Option(0.25, float, low=0, high=1, help="share rho of the state-full space"),
        "proj": Option("blocks", str, choices=PROJECTIONS,
                       help="state-full part: whole weights (blocks), an SVD or random subspace, or random entries"),
        "state_free": Option("sign", str, choices=STATE_FREE_RULES,
                             help="update of the rest: signSGD (the paper's), SGD, or none"),
        "state_free_lr_scale": Option(1.0, float, low=0, help="learning-rate multiplier of the state-free update"),
        "block_order": Option("random", str, choices=BLOCK_ORDERS, help="which weights become state-full at a switch"),
    }
    _svd_projector = RankedSVDProjector()

    def projector_for(self, group: Mapping[str, Any]) -> Projector:
        proj = group["proj"]
        if proj == "svd":
            return self._svd_projector
        if proj == "random":
            return RandomOrthogonalProjector(group)
        if proj == "coordinates":
            return CoordinateProjector(group)
        return BlockProjector(lambda: [self.parameter_seed(p, group) for p in group["params"]])

    def check_group(self, group: Mapping[str, Any], params: Sequence[torch.Tensor]) -> None:
        super().check_group(group, params)
        rank, proj, density = group["rank"], group["proj"], group["density"]
        if rank is not None and proj not in ("svd", "random"):
            raise RankwiseError(f"rank applies to proj='svd' or 'random'; proj={proj!r} takes density only")
        if proj == "blocks":
            return
        for param in params:
            if proj == "coordinates":
                size = coordinate_count(param.shape, density)
            else:
                size = subspace_rank(param.shape, group)
            if size < 1:
                raise RankwiseError(
                    f"density {density} leaves no state-full part in {self.param_name(param)} "
                    f"({param.shape[0]} x {param.shape[1]}); raise density or use proj='blocks'"
                )

    def switch_moments(self, state: dict, group: Mapping[str, Any], old: Basis, new: Basis) -> None:
        """As the base policies, except: a weight that gains or loses its state-full part
        (``blocks``) always resets, and ``coordinates`` carry entries selected again."""
        policy = group["moment_policy"]
        if isinstance(old, BlockBasis) and old.active != new.active:
            policy = "reset"  # the weight gains or loses its state-full part: no moments to carry
        if policy == "rotate" and isinstance(old, CoordinateBasis):
            carry_coordinates(state, group, old.indices, new.indices)
            return
        super().switch_moments(state, {**group, "moment_policy": policy}, old, new)


def carry_coordinates(state: dict, group: Mapping[str, Any], old: torch.Tensor, new: torch.Tensor) -> None:
    """Moments (and per-coordinate history weights) of entries selected again move to their new
    position; new entries start at zero."""
    if "exp_avg" not in state:
        return
    if group.get("bias_correction") == "per_coordinate" and group["correct_bias"] and WEIGHT_KEYS[0] not in state:
        for key, correction in zip(WEIGHT_KEYS, bias_corrections(state, group)):
            state[key] = torch.full_like(state["exp_avg"], correction, dtype=torch.promote_types(
                state["exp_avg"].dtype, torch.float32))
    position = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    kept = old[position] == new
    for key in ("exp_avg", "exp_avg_sq", *WEIGHT_KEYS):
        if key in state:
            carried = torch.zeros_like(state[key])
            carried[kept] = state[key][position[kept]]
            state[key] = carried


FRUGAL = FrugalAdamW
"""The paper's name for :class:`FrugalAdamW`."""
