"""LoRA-SB: LoRA-XS-shaped adapter initialised from the approximated first full fine-tuning update.

Ponkshe, Singhal, Gorbunov, Tumanov, Horvath & Vepakomma 2024, "Initialization using Update
Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning",
arXiv 2411.19557. Architecture of LoRA-XS (Balazy et al. 2024, arXiv 2405.17604).

    h = W' x + s B R A x,     B in R^{out x r}, A in R^{r x in} frozen;  R in R^{r x r} trainable

so one layer trains ``r^2`` parameters and ``delta_weight() = s B R A`` (``s = alpha / r``).
The data gives ``G = mean_b dL_b/dW``; the first update of full fine-tuning is approximated as

    dW_1 = -lr_1 * sign(G)     (``update="adam"``: Adam's first step, m_1 / sqrt(v_1) = sign(g_1))
    dW_1 = -lr_1 * G           (``update="sgd"``)

and its truncated SVD ``dW_1 ~ U_r diag(S_r) V_r^T`` gives (the paper's Theorem: the optimal
rank-r approximation of the first update, and the gradient of R then projects every later
full gradient onto the same fixed subspaces)

    B = U_r,    A = V_r^T,    R0 = diag(S_r) / s       so  s B R0 A = trunc_r(dW_1).

Start (default ``start_from_update=True``, the paper's method and the authors' release): the
base weight is untouched and training starts from ``W + trunc_r(dW_1)``, the simulated first
step. B and A are frozen and the gradient of R does not depend on R, so this first step is
the only place where the initialisation of R (and ``lr_1``) enters training.
``start_from_update=False`` instead rewrites the base to ``W' = W - s B R0 A`` so the output
at init equals the base model's (rankwise's convention for the other LoRA-family inits);
then ``lr_1`` has no effect on training at all -- only the subspaces B, A do.

``lr_1``, the learning rate of the simulated step, is the learning rate of the FIRST step of
the fine-tuning run that follows: the authors' code computes it as
``lr / (warmup_ratio * total_steps)``, i.e. ``lr / warmup_steps``, the first step of a linear
warm-up. Pass it as ``update_lr``, or let it be derived from ``train_lr`` / ``warmup_steps``
(the run's peak learning rate and warm-up steps; with the defaults ``train_lr = 1e-3`` -- the
authors' GLUE script default -- and no warm-up, ``lr_1 = 1e-3``). ``niter`` selects a
randomized SVD (as PiSSA's option). The SVDs of same-shape layers run as one batched call
(:class:`~rankwise.adapters.gradient_family.GradientSVDInit`), on the weights' device, in fp32;
with ``start_from_update=False`` (the base rewritten) ``init_report(model)["residual_error"]``
gives ``||W - s B R0 A||_F / ||W||_F`` (the default leaves the base as it is: no residual).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer
from rankwise.adapters.gradient_family import GradientSVDInit
from rankwise.calibration import LayerStatistics
from rankwise.common_options import NITER
from rankwise.options import Option


@ADAPTERS.register(
    "lora_sb",
    family="data_init",
    paper="Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning",
    arxiv="2411.19557",
    supports=LINEAR_LIKE,
)
class LoraSbLayer(GradientSVDInit, AdapterLayer):
    """``base(x) + s B R A x`` with frozen ``B, A`` from the SVD of the approximated first update."""

    OPTIONS = {
        "update": Option(
            "adam", str, choices=("adam", "sgd"), help="first update: adam = -lr_1 sign(G), sgd = -lr_1 G"
        ),
        "update_lr": Option(None, float, low=0, low_open=True, nullable=True,
                            help="lr_1 of the simulated first step; None = train_lr / max(warmup_steps, 1)"),
        "train_lr": Option(
            1e-3, float, low=0, low_open=True, help="peak learning rate of the fine-tuning run that follows"
        ),
        "warmup_steps": Option(0, int, low=0, help="linear warm-up steps of that run (0 = none)"),
        "start_from_update": Option(
            True, bool, help="start from W + trunc_r(dW_1) (the paper); False: output = base at init"
        ),
        "niter": NITER,
    }
    statistics = ("weight_gradient",)

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        self.register_buffer("lora_A", torch.empty(self.rank, self.in_features, **self.factory))
        self.register_buffer("lora_B", torch.empty(self.out_features, self.rank, **self.factory))
        self.register_buffer("init_R", torch.empty(self.rank, self.rank, **self.factory))
        self.lora_R = nn.Parameter(torch.empty(self.rank, self.rank, **self.factory))

    @property
    def rewrites_base(self) -> bool:  # type: ignore[override]
        return not self.options["start_from_update"]

    def first_step_lr(self) -> float:
        """``lr_1``: ``update_lr``, else ``train_lr / warmup_steps`` (the first step of a linear warm-up)."""
        if self.options["update_lr"] is not None:
            return self.options["update_lr"]
        return self.options["train_lr"] / max(self.options["warmup_steps"], 1)

    def svd_matrix(self, gradient: torch.Tensor) -> torch.Tensor:
        """The approximated first update ``dW_1`` (sign(G) and G have different spectra: the update is decomposed)."""
        return -self.first_step_lr() * (torch.sign(gradient) if self.options["update"] == "adam" else gradient)

    def initialize(self, stats: LayerStatistics | None = None) -> None:
        u, s, vh = self.gradient_triplets(stats)
        with torch.no_grad():
            self.lora_B.copy_(u.to(self.lora_B.dtype))
            self.lora_A.copy_(vh.to(self.lora_A.dtype))
            r0 = torch.diag(s / self.scaling)
            self.init_R.copy_(r0.to(self.init_R.dtype))
            self.lora_R.copy_(r0.to(self.lora_R.dtype))

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_R @ self.lora_A)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_R.T) @ self.lora_B.T * self.scaling

    def base_offset(self) -> torch.Tensor:
        up, down = self.base_offset_factors()
        return up @ down

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s B R, A)`` (fp32): ``B' @ A' == delta_weight()``."""
        return self.scaling * (self.lora_B.float() @ self.lora_R.detach().float()), self.lora_A.float()

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s B R0, A)`` (fp32): ``B0' @ A0' == base_offset()`` (used when the base is rewritten)."""
        return self.scaling * (self.lora_B.float() @ self.init_R.float()), self.lora_A.float()
