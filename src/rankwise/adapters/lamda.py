"""LaMDA: a frozen first projection, a trainable r x r core, a second projection frozen progressively.

Azizi, Kundu & Pedram 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed
Low-Dimensional Adaptation", Findings of EMNLP 2024, arXiv 2406.12832.

The update of a frozen ``out x in`` weight ``W0`` passes through an ``r``-dimensional space:

    h = W0 x + s B S A x,    dW = s B S A,    s = alpha / r

``A`` (r x in, the paper's PMA) is frozen from the start, ``S`` (r x r, the low-dimensional
adapter) trains throughout, and ``B`` (out x r, PMB) trains at first and is frozen column by
column: over the first ``t_i = freeze_fraction * total_steps`` optimizer steps, column ``j``
(``j = 0, 1, ...``: the direction of the ``j``-th largest singular value) freezes once
``step >= (j + 1) t_i / r``, so ``B`` is completely frozen after ``t_i`` steps and only the
``r^2`` entries of ``S`` train from there on (the training loop calls ``after_step``). A frozen
column's value is copied to the buffer ``B_frozen`` and the forward reads it from there, so an
optimizer's momentum cannot move it; once every column is frozen ``B`` leaves the graph, so no
gradient is computed for it and optimizers skip it (the paper's saving of the weight-update
compute; it still counts as a trainable parameter, so a reloaded adapter counts the same). Trainable parameters per layer
at the start: ``r out + r^2``; after ``t_i``: ``r^2``.

Init (option ``init``): ``"svd"`` (default, the paper's spectral decomposition of the
pre-trained weight): ``W0 = U diag(sigma) V^T``, ``A = V_r^T``, ``B = U_r`` and ``S = 0``, so the
output equals the base model's at init and the update starts in ``W0``'s principal subspaces;
``"random"`` (the authors' released code, a LoRA layer with a square matrix inserted): ``A``
and ``S`` kaiming-uniform (nn.Linear's default), ``B = 0``.

LaMDA++ (option ``rank_allocation="spectral"``): the ranks of the layers are redistributed from
the normalised spectra of the pre-trained weights, keeping the total ``L r`` of a uniform
allocation. With ``p_i = sigma_i^2 / sum_j sigma_j^2`` a layer's energy score is
``E = sum_{i <= r} p_i`` (the share of ``W0``'s energy its top ``r`` directions hold); layer
``l`` gets a rank proportional to ``1 - E_l`` (largest-remainder rounding, each rank in
``[1, min(in, out)]``): a weight whose spectrum is spread out gets more rank than one that
its first ``r`` directions already describe.

Deviations and choices: the paper's text beyond its abstract (the exact freezing schedule,
the LaMDA++ score) was not available when this was written; the schedule follows its Fig. 1
caption ("PMB is trainable and gradually freezes based on the singular values; after t_i
iterations PMB is completely frozen"), with ``freeze_fraction = 0.3`` taken from the release's
``eta = 0.3``. The release instead zeroes the gradient of the first ``floor(step / (eta T))``
columns, which leaves Adam's momentum moving them and never freezes more than ``1 / eta``
columns. The LaMDA++ score above is this module's reading of "normalised spectrum analysis".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer
from rankwise.adapters.hooks import check_total_steps
from rankwise.adapters.rewrite import principal_triplets
from rankwise.common_options import NITER
from rankwise.layers import dense_weight, features
from rankwise.options import Option


def spectral_ranks(spectra: dict[str, torch.Tensor], rank: int, limits: dict[str, int]) -> dict[str, int]:
    """LaMDA++'s allocation: rank of layer ``l`` proportional to ``1 - E_l`` with ``E_l`` the energy share
    of its top ``rank`` singular values, total ``len(spectra) * rank``, each in ``[1, limits[l]]``."""
    names = list(spectra)
    shortfall = {}
    for name in names:
        energy = spectra[name].double().pow(2)
        shortfall[name] = 1.0 - float(energy[:rank].sum() / energy.sum()) if energy.sum() > 0 else 0.0
    budget = len(names) * rank
    total = sum(shortfall.values())
    if total <= 0:  # every top-r part already holds all the energy: nothing to redistribute
        return {name: min(rank, limits[name]) for name in names}
    shares = {name: budget * shortfall[name] / total for name in names}
    ranks = {name: math.floor(share) for name, share in shares.items()}
    for name in sorted(names, key=lambda n: shares[n] - ranks[n], reverse=True)[: budget - sum(ranks.values())]:
        ranks[name] += 1
    return {name: max(1, min(value, limits[name])) for name, value in ranks.items()}


@ADAPTERS.register(
    "lamda",
    family="multi_branch",
    paper="LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation",
    arxiv="2406.12832",
    supports=LINEAR_LIKE,
)
class LamdaLayer(AdapterLayer):
    """``W0 x + s B S A x``: ``A`` frozen, ``S`` (r x r) trained, ``B`` frozen column by column."""

    OPTIONS = {
        "init": Option("svd", str, choices=("svd", "random"),
                       help="svd: A, B = top singular vectors of W0, S = 0 (paper); random: the release's LoRA init"),
        "freeze_fraction": Option(0.3, float, low=0, high=1, low_open=True,
                                  help="share of the run over which B's columns freeze one by one (t_i / T)"),
        "rank_allocation": Option("uniform", str, choices=("uniform", "spectral"),
                                  help="spectral: LaMDA++'s per-layer ranks from the weights' normalised spectra"),
        "niter": NITER,
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        self.register_buffer("lamda_A", torch.empty(self.rank, self.in_features, **self.factory))
        self.lamda_S = nn.Parameter(torch.empty(self.rank, self.rank, **self.factory))
        self.lamda_B = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))
        self.register_buffer("B_frozen", torch.zeros(self.out_features, self.rank, **self.factory))
        self.register_buffer("frozen_columns", torch.zeros((), dtype=torch.int64, device=self.factory["device"]))

    @classmethod
    def allocate_ranks(
        cls, rank: int, bases: dict[str, nn.Module], stats: dict, options: dict[str, Any]
    ) -> dict[str, int]:
        if options["rank_allocation"] == "uniform":
            return {name: rank for name in bases}
        spectra = {name: torch.linalg.svdvals(dense_weight(base, torch.float32)) for name, base in bases.items()}
        limits = {name: cls.max_rank(*reversed(features(base))) for name, base in bases.items()}
        return spectral_ranks(spectra, rank, limits)

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            if self.options["init"] == "svd":
                u, _, vh = principal_triplets(self)
                self.lamda_A.copy_(vh)
                self.lamda_B.copy_(u)
                self.lamda_S.zero_()
            else:
                nn.init.kaiming_uniform_(self.lamda_A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(self.lamda_S, a=math.sqrt(5))
                self.lamda_B.zero_()
            self.B_frozen.zero_()
            self.frozen_columns.zero_()

    def projection_B(self) -> torch.Tensor:
        """``B`` as the forward uses it: the frozen leading columns from ``B_frozen``, the rest trained."""
        k = int(self.frozen_columns)
        if k >= self.rank:  # B out of the graph: no gradient is computed for it, the optimizer skips it
            return self.B_frozen
        return torch.cat([self.B_frozen[:, :k], self.lamda_B[:, k:]], dim=1)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.projection_B() @ self.lamda_S @ self.lamda_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        core = self.project_in(x, self.lamda_A) @ self.lamda_S.T
        return self.project_out(core, self.projection_B()) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s B S, A)`` in fp32: the update is exactly rank-r factored."""
        with torch.no_grad():
            return self.scaling * (self.projection_B().float() @ self.lamda_S.float()), self.lamda_A.float()

    def freeze_columns(self, count: int) -> None:
        """Freeze ``B``'s leading ``count`` columns (their current values kept in ``B_frozen``)."""
        k = int(self.frozen_columns)
        count = min(count, self.rank)
        if count > k:
            with torch.no_grad():
                self.B_frozen[:, k:count].copy_(self.lamda_B[:, k:count])
                self.frozen_columns.fill_(count)

    @classmethod
    def after_step(
        cls, layers: dict[str, LamdaLayer], *, step: int, total_steps: int, optimizer: Any = None
    ) -> None:
        check_total_steps(total_steps, 1, "lamda", "pass the run's total number of optimizer steps")
        for layer in layers.values():
            horizon = layer.options["freeze_fraction"] * total_steps
            layer.freeze_columns(math.floor(step * layer.rank / horizon))
