"""SVD-free low-rank Adam on a shared DCT basis (``dct``, :class:`DCTAdamW`).

Paper: Modoranu, Safaryan, Schultheis, Ryabinin, Chumachenko, Alistarh, "FFT-based Dynamic
Subspace Selection for Low-Rank Adaptive Optimization of Large Language Models" (v1 title:
"SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models"),
arXiv 2505.17967 (DCT-AdamW).

For a weight ``W`` (``m x n``) with gradient ``G_t``, rank ``r``, refresh gap ``T``, written
for a right projection (``proj_type="std"`` with ``m >= n``; a left one is the transpose)::

    once per size n, shared by every weight:  Q = DCT-II matrix (n x n, orthonormal columns)
    every T steps:  S = G_t Q                                   (alignment of G with each column)
                    I = indices of the r largest ||S[:, j]||_1   (stored: r integers)
                    moments carried over:  M <- M C, V <- V C,  C = Q[:, I_old]^T Q[:, I] (0/1 matrix)
    g_t = G_t Q[:, I]                                            (m x r)
    M_t = b1 M + (1 - b1) g_t ;  V_t = b2 V + (1 - b2) g_t^2
    W  -= lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * (M_t / (sqrt(V_t) + eps)) Q[:, I]^T
    W  -= lr * weight_decay * W

With ``dct_backend="matmul"`` (default) ``Q`` lives once per (size, dtype, device) in
``optimizer.shared_buffers`` (counted once by :func:`rankwise.optim.state_bytes`), built in
float64 at the first refresh that needs it, and ``S`` is a matmul. ``dct_backend="fft"``
stores no matrix at all: ``S`` comes from Makhoul's FFT algorithm
(:func:`rankwise.linalg.dct.dct_rows`, ``O(mn log n)`` instead of ``O(mn^2)``) and the ``r``
selected columns are generated from the cosine formula at every step (``O(nr)``).
Because the columns of ``Q`` are orthonormal, ``C`` is exactly the 0/1 matrix matching equal
indices: the moments of a column kept across a refresh move to its new position unchanged
and a newly selected column starts from zero (the paper's ``m R`` and ``|v R|``).
State per ``m x n`` weight (``m <= n``): moments ``2 r n`` plus ``r`` int32 indices, plus
(matmul backend) the ``m x m`` matrix shared by every weight whose projected side has size ``m``.

Error feedback (the paper's ``Xi``; ``error_feedback=True``): the discarded part of the
corrected gradient is carried to the next step (:class:`rankwise.optim.rules.ErrorFeedback`)::

    G~_t = G_t + Xi_{t-1} ;  I and g_t are computed from G~_t ;  Xi_t = G~_t - g_t Q[:, I]^T

so ``sum_t g_t Q[:, I_t]^T + Xi_T = sum_t G_t``: no gradient is lost, only delayed. It costs
a full ``m x n`` buffer per weight (``state["error"]``, in the weight's dtype), so it is off
by default.

Adam in the paper's form (Algorithm ``DCT-AdamW``; also the authors' release,
ISTA-DASLab-Optimizers' ``DCTAdamW``): ``eps`` is added to the *bias-corrected*
``sqrt(v_hat)`` and defaults to 1e-8::

    W -= lr * m_hat / (sqrt(v_hat) + eps) Q[:, I]^T,   m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)

rankwise's common Adam adds ``eps`` to the uncorrected ``sqrt(v)`` with the correction in the
step size; DCT passes ``eps * sqrt(1 - b2^t)`` there, which is the same update exactly. (With
GaLore's 1e-6 on the uncorrected ``sqrt(v)`` the damping would be 100x the paper's in steady
state and ~3000x at the first step.)

Deviations from the paper / the authors' release:
- ``update_proj_gap`` defaults to 1 (a new column selection at every step: the selection
  costs one matmul or FFT, which is the paper's point), the default of the authors' release;
  the paper's algorithm is written for a gap ``T_u``. (rankwise's earlier default, 200, was
  GaLore's.)
- ``moment_policy`` defaults to ``rotate`` (the paper's algorithm rotates the moments by
  ``R = Q_prev^T Q_crt``; the release's ``rotate_subspace`` defaults to False); ``keep`` and
  ``reset`` are offered.
- Error feedback is off by default (the residual is dropped, as in GaLore), because its
  buffer is larger than the memory the projection saves; the paper treats it as an option too.
- ``scale`` (default 1.0, i.e. the paper's update) multiplies the update as GaLore's does.
- The projected side follows GaLore's ``proj_type`` (``std``: the shorter side, so the shared
  matrix is ``min(m, n)`` square).
- Weight decay is applied after the update (the release decays before it).
- With the matmul backend ``S`` is computed in the weight's dtype (bf16 for bf16 weights,
  with a bf16 ``Q``); the fft backend computes it in float32 (float64 for float64 weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from rankwise.linalg.dct import dct_columns, dct_matrix, dct_rows
from rankwise.linalg.projections import Basis, projection_sides
from rankwise.optim.base import OPTIMIZERS
from rankwise.optim.inner import AdamMoments
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.optim.options import ADAM, SUBSPACE, with_defaults
from rankwise.optim.pieces import Projector
from rankwise.optim.rules import ErrorFeedback, add_error
from rankwise.options import Option

DCT_BACKENDS = ("matmul", "fft")
INDEX_DTYPE = torch.int32


@dataclass(frozen=True)
class SelectedColumnsBasis(Basis):
    """Columns ``I`` of orthonormal matrices: ``L = Q_m[:, I_left]``, ``R = Q_n[:, I_right]``.

    :meth:`transition` is computed from the indices: ``C[i, j] = 1`` iff old index ``i``
    equals new index ``j`` (exactly ``L_new^T L_old`` / ``R_old^T R_new`` without round-off).
    """

    left_indices: torch.Tensor | None = None
    right_indices: torch.Tensor | None = None

    def transition(self, new: Basis) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not isinstance(new, SelectedColumnsBasis):
            return super().transition(new)
        if (self.left is None) != (new.left is None) or (self.right is None) != (new.right is None):
            raise ValueError("cannot switch between bases projecting on different sides")
        c_left = _matches(new.left_indices, self.left_indices, self.left.dtype) if self.left is not None else None
        c_right = _matches(self.right_indices, new.right_indices, self.right.dtype) if self.right is not None else None
        return c_left, c_right


def _matches(rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (rows.unsqueeze(1) == cols.unsqueeze(0)).to(dtype)


def alignment_scores(grad: torch.Tensor, basis: torch.Tensor | None, side: str) -> torch.Tensor:
    """l1 norm of ``G``'s coordinates on each DCT vector: columns of ``G Q`` (right) or rows of ``Q^T G`` (left).

    ``basis`` is the DCT matrix ``Q`` of that side's size, or ``None`` to transform by FFT.
    """
    oriented = grad if side == "right" else grad.T
    coefficients = oriented @ basis if basis is not None else dct_rows(oriented)
    return coefficients.abs().sum(dim=0)


@dataclass(frozen=True)
class DCTProjector(Projector):
    """Top-``rank`` DCT columns by l1 alignment; stores ``proj_left_indices`` / ``proj_right_indices``.

    ``backend="matmul"``: one DCT matrix per (size, dtype, device), built once into the
    optimizer's ``shared_buffers``; the selected columns are gathered from it.
    ``backend="fft"``: no matrix at all; alignment by Makhoul's FFT, selected columns
    generated from the cosine formula at each step.
    """

    rank: int
    proj_type: str
    backend: str
    shared: dict

    def dct(self, size: int, like: torch.Tensor) -> torch.Tensor:
        key = f"dct{size}:{str(like.dtype).removeprefix('torch.')}:{like.device}"
        if key not in self.shared:
            self.shared[key] = dct_matrix(size, dtype=like.dtype, device=like.device)
        return self.shared[key]

    def columns(self, size: int, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.backend == "fft":
            return dct_columns(size, indices, dtype=like.dtype)
        return self.dct(size, like).index_select(1, indices)

    def refresh(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any], *, seed: int) -> None:
        use_left, use_right = projection_sides(grad.shape, self.proj_type)
        for side, used, size in (("left", use_left, grad.shape[0]), ("right", use_right, grad.shape[1])):
            if used:
                basis = self.dct(size, grad) if self.backend == "matmul" else None
                scores = alignment_scores(grad, basis, side)
                state[f"proj_{side}_indices"] = torch.topk(scores, self.rank).indices.to(INDEX_DTYPE)

    def has_basis(self, state: Mapping[str, Any]) -> bool:
        return "proj_left_indices" in state or "proj_right_indices" in state

    def basis(self, state: Mapping[str, Any], param: torch.Tensor) -> SelectedColumnsBasis:
        left_indices, right_indices = state.get("proj_left_indices"), state.get("proj_right_indices")
        left = self.columns(param.shape[0], left_indices, param) if left_indices is not None else None
        right = self.columns(param.shape[1], right_indices, param) if right_indices is not None else None
        return SelectedColumnsBasis(left, right, left_indices, right_indices)


class CorrectedEpsAdam(AdamMoments):
    """Adam with ``eps`` added to the bias-corrected ``sqrt(v_hat)`` (the paper's form): the
    common Adam with ``eps * sqrt(1 - b2^t)`` on the uncorrected ``sqrt(v)``."""

    def update(self, state: dict, grad: torch.Tensor, group: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
        if not group["correct_bias"]:
            return super().update(state, grad, group)
        steps = state["step"] - state.get("moment_origin", 0)
        eps = group["eps"] * math.sqrt(1.0 - group["betas"][1] ** steps)
        return super().update(state, grad, {**group, "eps": eps})


@OPTIMIZERS.register(
    "dct",
    family="dct",
    paper="FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of Large Language Models",
    arxiv="2505.17967",
    supports=("layerwise", "ddp", "fsdp2"),
)
class DCTAdamW(LowRankAdamW):
    """Adam on the ``rank`` DCT columns best aligned with each gradient (see module docstring).

    ``DCTAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, correct_bias=True)``
    (``eps`` on the bias-corrected ``sqrt(v_hat)``); group keys ``rank``, ``update_proj_gap``
    (default 1), ``scale``, ``proj_type`` (as GaLore), ``moment_policy`` (default ``rotate``),
    ``bias_correction``, ``dct_backend`` (matmul | fft) and ``error_feedback`` (default False).
    """

    inner = CorrectedEpsAdam()
    update_rule = ErrorFeedback()
    HYPERPARAMETERS = with_defaults(ADAM, eps=1e-8)
    OPTIONS = {
        **with_defaults(SUBSPACE, update_proj_gap=1, scale=1.0, moment_policy="rotate"),
        "dct_backend": Option("matmul", str, choices=DCT_BACKENDS,
                              help="matmul: one shared DCT matrix per size; fft: Makhoul's FFT, no matrix stored"),
        "error_feedback": Option(False, bool, help="carry the dropped part of each gradient to the next step (m x n)"),
    }

    def projector_for(self, group: Mapping[str, Any]) -> Projector:
        return DCTProjector(group["rank"], group["proj_type"], group["dct_backend"], self.shared_buffers)

    def prepare_gradient(self, grad: torch.Tensor, state: dict, group: Mapping[str, Any]) -> torch.Tensor:
        """``G + Xi``: the selection and the step see the corrected gradient."""
        return add_error(grad, state, group)
