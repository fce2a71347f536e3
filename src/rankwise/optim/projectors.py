"""Projectors several optimizers share: GaLore's SVD subspace and seeded Gaussian sketches.

- :class:`SVDProjector` (GaLore, arXiv 2403.03507; also Fira, Q-GaLore's float path,
  GradNormLoRP, APOLLO's and FRUGAL's ``svd`` variants, LDAdam's first step): the top-``rank``
  singular vectors of the current gradient.
- :class:`GaussianProjector` (APOLLO, arXiv 2412.05270): ``P ~ N(0, 1/rank)`` regenerated
  from a stored integer seed, with :class:`GaussianBasis`, whose coordinate change between
  two non-orthonormal sketches is the least-squares one.
- :class:`SeededProjector`: the base of every random projector (APOLLO's, FRUGAL's random
  subspaces and coordinates): a refresh stores only an integer seed, ``basis`` regenerates.
- :func:`mix_seed`: the seed derivation every random choice of the optimizers uses.
- :data:`REFRESH`: the group keys of every SVD-based projector's refresh (``refresh`` =
  svd | randomized | warm, ``refresh_niter``, ``refresh_oversample``), declared once here;
  a method whose subspace is an SVD puts them in its ``OPTIONS``.

Batched refresh: :meth:`SVDProjector.decompose` takes every parameter of a group whose
refresh is due at this step and decomposes the same-shape gradients in one batched call
(:func:`rankwise.linalg.projections.singular_bases`); :class:`~rankwise.optim.lowrank.LowRankAdamW`
calls it once per group before the per-parameter steps and hands each parameter its basis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from rankwise.linalg.projections import REFRESH_MODES, Basis, projection_sides, seeded_gaussian, singular_bases
from rankwise.optim.pieces import Projector, RefreshItem
from rankwise.options import Option

REFRESH: dict[str, Option] = {
    "refresh": Option(
        "svd", str, choices=REFRESH_MODES,
        help="how an SVD subspace is recomputed: svd = exact thin SVD (the papers'), randomized = range finder "
        "with oversampling and power iterations, warm = block power iterations from the previous basis",
    ),
    "refresh_niter": Option(2, int, low=0, help="power iterations of the randomized / warm refresh"),
    "refresh_oversample": Option(10, int, low=0, help="extra random directions of the randomized / warm refresh"),
}

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, salt: int) -> int:
    """A 63-bit seed from ``(seed, salt)`` by the SplitMix64 finaliser (distinct inputs -> unrelated seeds)."""
    z = (seed * 0x9E3779B97F4A7C15 + salt + 0x632BE59BD9B4E8B5) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class SVDProjector(Projector):
    """GaLore's projector: top-``rank`` singular vectors of the current gradient (float32,
    float64 for float64 gradients), computed by the group's ``refresh`` mode (:data:`REFRESH`).

    ``L = U[:, :r]`` / ``R = V[:, :r]`` on the side(s) chosen by ``proj_type``, stored in
    the gradient's dtype as ``state["proj_left"]`` / ``state["proj_right"]``. The random test
    matrix of ``randomized`` / ``warm`` is drawn from ``mix_seed(seed, state["step"])``, so a
    resumed run draws the same one.
    """

    batched = True

    def rank_for(self, shape: Sequence[int], group: Mapping[str, Any]) -> int:
        """The subspace's rank for an ``m x n`` gradient (``group["rank"]``; FRUGAL derives it)."""
        return group["rank"]

    def decompose(self, items: Sequence[RefreshItem], group: Mapping[str, Any]) -> list[Basis]:
        """New bases for ``items``; same-shape gradients share one batched decomposition."""
        by_rank: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            sides = projection_sides(item.grad.shape, group["proj_type"])
            by_rank.setdefault((self.rank_for(item.grad.shape, group), sides), []).append(index)
        result: list[Basis | None] = [None] * len(items)
        mode = group["refresh"]
        for (rank, (use_left, use_right)), members in by_rank.items():
            chosen = [items[i] for i in members]
            previous = None
            if mode == "warm":
                previous = [self.basis(it.state, it.grad) if self.has_basis(it.state) else None for it in chosen]
            bases = singular_bases(
                [it.grad for it in chosen], rank, use_left=use_left, use_right=use_right, mode=mode,
                niter=group["refresh_niter"], oversample=group["refresh_oversample"],
                seeds=[mix_seed(it.seed, it.state["step"]) for it in chosen], previous=previous,
            )
            for index, basis in zip(members, bases):
                result[index] = basis
        return result  # type: ignore[return-value]

    def store(self, state: dict, basis: Basis, grad: torch.Tensor, group: Mapping[str, Any]) -> None:
        """Write a new ``basis`` (from :meth:`decompose`) into ``state``."""
        for key, factor in (("proj_left", basis.left), ("proj_right", basis.right)):
            if factor is not None:
                state[key] = factor

    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        self.store(state, self.decompose([RefreshItem(grad, state, seed)], group)[0], grad, group)

    def has_basis(self, state: Mapping[str, Any]) -> bool:
        return "proj_left" in state or "proj_right" in state

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> Basis:
        return Basis(state.get("proj_left"), state.get("proj_right"))


class SeededProjector(Projector):
    """A random subspace stored as ``state["proj_seed"] = mix_seed(parameter seed, step)`` only;
    subclasses regenerate it from that seed in ``basis``."""

    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        state["proj_seed"] = mix_seed(seed, state["step"])

    def has_basis(self, state: Mapping[str, Any]) -> bool:
        return "proj_seed" in state


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
            work = torch.promote_types(self.left.dtype, torch.float32)
            gram = (self.left.T @ self.left).to(work)
            c_left = torch.linalg.solve(gram, (self.left.T @ new.left).to(work)).T.to(self.left.dtype)
        if self.right is not None:
            work = torch.promote_types(self.right.dtype, torch.float32)
            gram = (self.right.T @ self.right).to(work)
            c_right = torch.linalg.solve(gram, (self.right.T @ new.right).to(work)).to(self.right.dtype)
        return c_left, c_right


@dataclass(frozen=True)
class GaussianProjector(SeededProjector):
    """``P ~ N(0, 1/rank)`` regenerated from ``state["proj_seed"]``; only the seed is stored.

    At a refresh ``proj_seed = mix_seed(parameter seed, step)``; the left factor (``m x r``)
    is drawn from ``proj_seed``, the right one (``n x r``) from ``mix_seed(proj_seed, 1)``,
    in float32 and cast to the parameter's dtype (the same matrices whatever the dtype).
    """

    rank: int
    proj_type: str

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> GaussianBasis:
        use_left, use_right = projection_sides(param.shape, self.proj_type)
        seed, std = state["proj_seed"], 1.0 / math.sqrt(self.rank)
        options = {"std": std, "device": param.device, "dtype": param.dtype}
        left = seeded_gaussian(param.shape[0], self.rank, seed, **options) if use_left else None
        right = seeded_gaussian(param.shape[1], self.rank, mix_seed(seed, 1), **options) if use_right else None
        return GaussianBasis(left, right)
