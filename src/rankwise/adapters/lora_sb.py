"""LoRA-SB: LoRA-XS-shaped adapter initialised from the approximated first full fine-tuning update.

Ponkshe, Singhal, Gorbunov, Tumanov, Horvath & Vepakomma 2024, "Initialization using Update
Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning",
arXiv 2411.19557. Architecture of LoRA-XS (Balazy et al. 2024, arXiv 2405.17604).

    h = W' x + s B R A x,     B in R^{out x r}, A in R^{r x in} frozen;  R in R^{r x r} trainable

so one layer trains ``r^2`` parameters and ``delta_weight() = s B R A`` (``s = alpha / r``).
The data gives ``G = mean_b dL_b/dW``; the first update of full fine-tuning is approximated as

    dW_1 = -lr * sign(G)      (``update="adam"``: Adam's first step, m_1 / sqrt(v_1) = sign(g_1))
    dW_1 = -lr * G            (``update="sgd"``)

with ``lr = update_lr``, and its truncated SVD ``dW_1 ~ U_r diag(S_r) V_r^T`` gives (the
paper's Theorem: the optimal rank-r approximation of the first update, and the gradient of
R then projects every later full gradient onto the same fixed subspaces)

    B = U_r,    A = V_r^T,    R0 = diag(S_r) / s       so  s B R0 A = trunc_r(dW_1).

Output at init: the paper starts training from ``W + trunc_r(dW_1)`` (the simulated first
step). By default (``start_from_update=False``) rankwise instead rewrites the base to
``W' = W - s B R0 A``, so the adapted model's output equals the base model's at init, like
every other LoRA-family init here; the subspaces B, A and the gradient of R -- what the
paper's analysis is about -- are unchanged, only the first simulated step is not applied.
``start_from_update=True`` keeps the paper's behaviour (base untouched, model moved by
``trunc_r(dW_1)``). ``niter`` selects a randomized SVD (as PiSSA's option).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, AdapterLayer
from rankwise.adapters.lora_ga import gradient_svd
from rankwise.adapters.rewrite import check_niter
from rankwise.calibration import LayerStatistics


@ADAPTERS.register(
    "lora_sb",
    family="data_init",
    paper="Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning",
    arxiv="2411.19557",
    needs_data=True,
)
class LoraSbLayer(AdapterLayer):
    """``base(x) + s B R A x`` with frozen ``B, A`` from the SVD of the approximated first update."""

    OPTIONS = {"update": "adam", "update_lr": 1e-3, "start_from_update": False, "niter": None}
    statistics = ("weight_gradient",)
    rewrites_base = True

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        if self.options["update"] not in ("adam", "sgd"):
            raise self.error(f"update must be 'adam' (-lr sign(G)) or 'sgd' (-lr G), got {self.options['update']!r}")
        lr = self.options["update_lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise self.error(f"update_lr must be a positive number, got {lr!r}")
        if not isinstance(self.options["start_from_update"], bool):
            raise self.error(f"start_from_update must be True or False, got {self.options['start_from_update']!r}")
        check_niter(self)
        self.scaling = self.alpha / self.rank
        self.register_buffer("lora_A", torch.empty(self.rank, self.in_features, **self.factory))
        self.register_buffer("lora_B", torch.empty(self.out_features, self.rank, **self.factory))
        self.register_buffer("init_R", torch.empty(self.rank, self.rank, **self.factory))
        self.lora_R = nn.Parameter(torch.empty(self.rank, self.rank, **self.factory))

    def initialize(self, stats: LayerStatistics | None = None) -> None:
        # sign(G) and G have different spectra, so the update (not G) is decomposed.
        if stats is not None and stats.weight_gradient is not None:
            lr = float(self.options["update_lr"])
            gradient = stats.weight_gradient
            update = -lr * (torch.sign(gradient) if self.options["update"] == "adam" else gradient)
            stats = LayerStatistics(weight_gradient=update)
        u, s, vh = gradient_svd(self, stats, self.rank)
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

    def _offset_r(self) -> torch.Tensor:
        # start_from_update keeps the paper's start: nothing is moved out of the base.
        return torch.zeros_like(self.init_R) if self.options["start_from_update"] else self.init_R

    def base_offset(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self._offset_r().float() @ self.lora_A.float())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s B R, A)`` (fp32): ``B' @ A' == delta_weight()``."""
        return self.scaling * (self.lora_B.float() @ self.lora_R.detach().float()), self.lora_A.float()

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s B R0, A)`` (fp32, zero when ``start_from_update``): ``B0' @ A0' == base_offset()``."""
        return self.scaling * (self.lora_B.float() @ self._offset_r().float()), self.lora_A.float()
