"""CorDA: context-oriented decomposition adaptation.

Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
Models for Task-Aware Parameter-Efficient Fine-tuning", arXiv 2406.05223.

For a layer ``y = W x`` (``W`` is ``out x in``) the data gives the input covariance
``C = X^T X / n`` (``in x in``, the ``n`` rows of X = the layer's inputs on
``adapt(..., data=...)``; the paper writes ``X X^T``, unnormalised -- dividing by ``n`` changes
neither the decomposition nor the residual, only makes the split of each component between
``A`` and ``B`` independent of how much data was passed, as in PEFT).
The weight is decomposed through the context it sees:

    C_d       = C + lambda * mean(diag C) * I          (damping, see below)
    W C_d     = U diag(S) V^T                          (thin SVD, fp32)
    W         = (W C_d) C_d^{-1} = U diag(S) (V^T C_d^{-1}) = sum_i s_i u_i (C_d^{-1} v_i)^T

Then r of these components become a LoRA adapter and the others stay in the frozen base:

- ``mode="ipm"`` (instruction-previewed): the r LARGEST components (those the task context
  stimulates most) are trained, the rest is frozen;
- ``mode="kpm"`` (knowledge-preserved): the r SMALLEST components are trained and the
  principal ones stay frozen, preserving what the context (e.g. QA data) relies on.

With the chosen index set ``I`` and the LoRA scaling ``s = alpha / r``:

    B0 = U_I diag(sqrt(S_I / s)),   A0 = diag(sqrt(S_I / s)) V_I^T C_d^{-1}
    W_res = W - s B0 A0,            B = B0, A = A0 (trainable)

so ``W_res + s B A = W``: the output at init equals the base model's exactly.

Damping (a deviation in detail, not in substance): C is singular whenever the data has
fewer tokens than ``in`` or the activations span a subspace, so ``C^{-1}`` does not exist.
The paper's release and PEFT add a multiple of the mean diagonal to C; here always
``lambda * mean(diag C)`` with ``lambda = damping`` (default 0.01, PEFT's starting value --
PEFT doubles it until an explicit inverse is accurate; a Cholesky solve needs no retry).
The identity ``W = (W C_d) C_d^{-1}`` holds for any damping, so the init is exact either
way; damping only changes which directions are called principal. A layer whose inputs
were all zero has no context and raises a RankwiseError.

The top components need no inverse (an exact speed-up for ipm): ``U^T W C_d = diag(S) V^T``
gives ``P_I = V_I^T C_d^{-1} = diag(S_I)^{-1} U_I^T W``, one ``r x out x in`` product instead of
the Cholesky factorisation of ``C_d`` (O(in^3)) and its solve, and ``s B0 A0 = U_I U_I^T W``
(a component with ``S_i = 0`` gets ``P_i = 0``: it contributes nothing either way). kpm's
smallest components keep the Cholesky solve, where dividing by a tiny ``S_i`` would amplify
rounding. The damped covariance of ipm is then checked by its mean diagonal (``C`` is a
covariance, so ``C_d`` is positive definite exactly when that is positive).

Option ``niter`` (ipm only): the top-r triplets of ``W C_d`` by a randomized SVD with that many
power iterations (PiSSA's option) instead of the full thin SVD; kpm needs the smallest
components, hence the full SVD. The decompositions of same-shape layers (the damping, Cholesky
factor, ``W C_d``, SVD, projection) run as one batched call per shape (chunks of at most
:data:`rankwise.adapters.rewrite.BATCH_NUMBERS` entries), on the weights' device, in fp32;
``init_report(model)["residual_error"]`` gives each layer's ``||W - s B0 A0||_F / ||W||_F``
(for ipm the share of ``W`` outside the r principal context components).

The LoRA-shaped rewrite machinery (trainable ``lora_A`` / ``lora_B`` starting at the buffers
``A0`` / ``B0``, ``base_offset = s B0 A0``, PEFT-export factors) is PiSSA's
:class:`~rankwise.adapters.rewrite.LoraRewriteLayer`. Scaling ``s = alpha / r``.
"""

from __future__ import annotations

from typing import Any

import torch

from rankwise.adapters.base import ADAPTERS, FULL_PRECISION
from rankwise.adapters.rewrite import LoraRewriteLayer, prefetch_batched, take_prefetched
from rankwise.calibration import LayerStatistics
from rankwise.common_options import NITER
from rankwise.linalg.covariance import CovarianceAccumulator
from rankwise.linalg.svd import svd, truncated_svd
from rankwise.options import Option


def damped_gram(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``C + damping * mean(diag C) * I`` in fp32 (batched: one mean per matrix)."""
    gram = gram.float()
    shift = damping * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return gram + shift[..., None, None] * eye


def context_decomposition(
    weight: torch.Tensor, covariance: torch.Tensor, damping: float, *, rank: int | None = None, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, P)`` with ``W = U diag(S) P`` where ``W C_d = U diag(S) V^T`` and ``P = V^T C_d^{-1}``.

    All ``min(out, in)`` components (``P`` by a Cholesky solve), or only the top ``rank`` (by a
    randomized SVD with ``niter`` power iterations when ``niter`` is given; ``P = diag(S)^{-1}
    U^T W``, module docstring). Batched: ``weight`` ``(..., out, in)`` and ``covariance``
    ``(..., in, in)`` give one decomposition per matrix in one call. Raises ValueError when a
    ``C_d`` is not positive definite (e.g. all-zero inputs).
    """
    weight = weight.float()
    c_damped = damped_gram(covariance.to(weight.device), damping)
    not_definite = ValueError("the damped input covariance is not positive definite")
    if not torch.isfinite(c_damped).all():
        raise not_definite
    if rank is not None:
        if not bool((torch.diagonal(c_damped, dim1=-2, dim2=-1).mean(-1) > 0).all()):
            raise not_definite
        u, s, _ = truncated_svd(weight @ c_damped, rank, niter=niter)
        inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        return u, s, inverse[..., :, None] * (u.mT @ weight)
    factor, info = torch.linalg.cholesky_ex(c_damped)
    if bool((info != 0).any()):
        raise not_definite
    u, s, vh = svd(weight @ c_damped)
    # V^T C_d^{-1} = (C_d^{-1} V)^T because C_d is symmetric.
    return u, s, torch.cholesky_solve(vh.mT.contiguous(), factor).mT


@ADAPTERS.register(
    "corda",
    family="data_init",
    paper="CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware Parameter-Efficient Fine-tuning",
    arxiv="2406.05223",
    supports=FULL_PRECISION,
)
class CordaLayer(LoraRewriteLayer):
    """CorDA: adapter = r components of ``W = U S (V^T C^{-1})``, top r (``ipm``) or bottom r (``kpm``)."""

    OPTIONS = {
        "mode": Option("ipm", str, choices=("ipm", "kpm"),
                       help="ipm: train the r principal context components; kpm: train the r smallest"),
        "damping": Option(0.01, float, low=0, low_open=True, help="covariance damping, relative to its mean diagonal"),
        "niter": NITER,
    }
    statistics = ("input_covariance",)

    def __init__(self, base, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        if self.options["niter"] is not None and self.options["mode"] == "kpm":
            raise self.error("niter (randomized SVD of the top components) needs mode='ipm'; kpm uses the smallest")

    @classmethod
    def prepare_initialization(cls, layers: dict[str, LoraRewriteLayer], stats: dict) -> None:
        """The context decompositions of same-shape layers in one batched call (damping, ``W C_d``,
        SVD, ``P``); a layer without statistics is left to its :meth:`initialize` (which refuses it)."""
        ready = {name: layer for name, layer in layers.items() if _covariance(stats.get(name)) is not None}
        names = {id(layer): name for name, layer in ready.items()}
        prefetch_batched(
            ready.values(),
            lambda layer: (layer.base_weight(), _covariance(stats[names[id(layer)]]).second_moment().float()),
            lambda first, weights, covariances: first.decompose(weights, covariances),
            lambda layer: layer.in_features * (layer.out_features + layer.in_features),  # W and C
        )

    def decompose(self, weight: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:func:`context_decomposition` with this layer's options (top ``rank`` for ipm, all for kpm)."""
        principal = self.options["mode"] == "ipm"
        return context_decomposition(
            weight, covariance, float(self.options["damping"]),
            rank=self.rank if principal else None, niter=self.options["niter"],
        )

    def initialize(self, stats: LayerStatistics | None = None) -> None:
        covariance = _covariance(stats)
        if covariance is None:
            raise self.error("no input rows were collected for this layer; pass data that runs through it")
        decomposed = take_prefetched(self)
        if decomposed is None:
            try:
                decomposed = self.decompose(self.base_weight(), covariance.second_moment())
            except ValueError as exc:
                raise self.error(f"{exc}; the layer saw only zero inputs -- pass data that activates it") from None
        u, s, projected = decomposed
        chosen = slice(0, self.rank) if self.options["mode"] == "ipm" else slice(s.shape[0] - self.rank, s.shape[0])
        root = (s[chosen] / self.scaling).sqrt()
        self.start_from(u[:, chosen] * root, root[:, None] * projected[chosen])


def _covariance(stats: LayerStatistics | None) -> CovarianceAccumulator | None:
    """The layer's collected input covariance, None when no input row reached it."""
    covariance = stats.input_covariance if stats is not None else None
    return None if covariance is None or covariance.count == 0 else covariance
