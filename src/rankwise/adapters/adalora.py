"""AdaLoRA: importance-based budget pruning of an SVD-form update.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv 2303.10512.

Each adapted ``out x in`` weight gets an update in SVD form (paper eq. 3)

    W = W0 + s * P diag(lambda) Q,   P in R^{out x r}, lambda in R^r, Q in R^{r x in},  s = alpha / r

with ``lambda = 0`` and Gaussian ``P``, ``Q`` at init (so the model equals the base model), and
the orthogonality regulariser (eq. 4), returned by ``regularization()`` for the training loop:

    R(P, Q) = gamma * (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2),     gamma = ``orth_reg_weight``.

Importance (eqs. 7-10), computed in ``after_step`` from every entry ``w`` of ``P``, ``lambda``
and ``Q`` after each optimizer step:

    I_t(w)    = |w * dL/dw|
    Ibar_t(w) = beta1 Ibar_{t-1}(w) + (1 - beta1) I_t(w)                   (sensitivity, EMA)
    Ubar_t(w) = beta2 Ubar_{t-1}(w) + (1 - beta2) |I_t(w) - Ibar_t(w)|     (uncertainty)
    s_t(w)    = Ibar_t(w) * Ubar_t(w)
    S_{k,i}   = s(lambda_{k,i}) + mean_j s(P_{k,ji}) + mean_j s(Q_{k,ij})   (triplet i of layer k)

Budget (eq. 12): ``b(0) = r * n`` triplets over the ``n`` adapted layers (``rank`` is the paper's
``init_r``), ``b(T) = target_r * n``, and with ``T = total_steps``, ``t_i = tinit``,
``t_f = tfinal``::

    b(t) = b(0)                                                   t < t_i
    b(t) = b(T) + (b(0) - b(T)) * (1 - (t - t_i) / (T - t_i - t_f))^3   t_i <= t < T - t_f
    b(t) = b(T)                                                   t >= T - t_f

(rounded down). Every ``deltaT`` steps from ``t_i`` on, the ``b(t)`` triplets with the highest
``S`` over all layers keep their ``lambda`` and the others are set to 0 (eq. 11). As in the
paper, only ``lambda`` is masked: ``P`` and ``Q`` stay, and a masked triplet can come back at a
later allocation if its importance rises. In the final ``t_f`` steps the mask chosen at the
first final step is kept and re-applied after every step. The current mask is the persistent
buffer ``rank_mask`` (saved with the adapter); tensors keep their pre-allocated size, so the
optimizer's parameters never change.

Deviations and choices: the paper says "random Gaussian" for ``P`` and ``Q``; they are drawn
with standard deviation ``1/sqrt(out)`` and ``1/sqrt(in)`` so that columns / rows have unit
expected norm (the regulariser starts near its minimum). The scaling ``s = alpha / r`` is the
LoRA convention (the paper has none; with ``alpha = r`` it is 1). Importance uses the gradients
present when ``after_step`` runs (after ``optimizer.step()``, before the next ``zero_grad``) and
the parameter values after the step. The EMA state is training state, not saved.

:class:`SvdTripletLayer` (the SVD-form layer) and :func:`update_smoothed_importance` are shared
with IncreLoRA, which builds on this parametrisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, AdapterLayer
from rankwise.errors import RankwiseError


def update_smoothed_importance(
    average: torch.Tensor, uncertainty: torch.Tensor, current: torch.Tensor, beta1: float, beta2: float
) -> None:
    """In place: ``Ibar = b1 Ibar + (1-b1) I``; ``Ubar = b2 Ubar + (1-b2) |I - Ibar|`` (new ``Ibar``)."""
    average.mul_(beta1).add_(current, alpha=1.0 - beta1)
    uncertainty.mul_(beta2).add_((current - average).abs(), alpha=1.0 - beta2)


def check_unit_interval(layer: AdapterLayer, name: str) -> None:
    value = layer.options[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise layer.error(f"{name} must be a number in (0, 1), got {value!r}")


def check_int(layer: AdapterLayer, name: str, low: int, high: int | None = None) -> None:
    value = layer.options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise layer.error(f"{name} must be an integer {bound}, got {value!r}")


def refuse_merged(layers: dict[str, AdapterLayer], method: str) -> None:
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise RankwiseError(
            f"{method} cannot run its training schedule on merged layers ({', '.join(merged[:3])}); "
            "call rankwise.unmerge(model) before training"
        )


class SvdTripletLayer(AdapterLayer):
    """``delta = P diag(sigma) Q`` with trainable ``P`` (out x r), ``lambda`` (r), ``Q`` (r x in).

    ``sigma = effective_singular_values()`` (subclasses fold scaling and masks into it);
    ``regularization()`` is the orthogonality penalty on the rows in ``regularized_rows()``.
    """

    OPTIONS = {"orth_reg_weight": 0.1}

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        weight = self.options["orth_reg_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise self.error(f"orth_reg_weight must be a number >= 0, got {weight!r}")
        self.lora_P = nn.Parameter(torch.empty(self.out_features, self.rank, **self.factory))
        self.lora_lambda = nn.Parameter(torch.empty(self.rank, **self.factory))
        self.lora_Q = nn.Parameter(torch.empty(self.rank, self.in_features, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            nn.init.normal_(self.lora_P, std=1.0 / math.sqrt(self.out_features))
            nn.init.normal_(self.lora_Q, std=1.0 / math.sqrt(self.in_features))
            nn.init.zeros_(self.lora_lambda)

    def effective_singular_values(self) -> torch.Tensor:
        raise NotImplementedError

    def regularized_rows(self) -> torch.Tensor | None:
        """Boolean mask of the triplets the orthogonality penalty covers (None: all)."""
        return None

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_P * self.effective_singular_values()) @ self.lora_Q

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.to(self.lora_Q.dtype) @ self.lora_Q.T) * self.effective_singular_values()) @ self.lora_P.T

    def regularization(self) -> torch.Tensor | None:
        weight = float(self.options["orth_reg_weight"])
        if weight == 0.0:
            return None
        rows = self.regularized_rows()
        left = self.lora_P.float() if rows is None else self.lora_P.float()[:, rows]
        right = self.lora_Q.float() if rows is None else self.lora_Q.float()[rows]
        eye = torch.eye(left.shape[1], device=left.device)
        return weight * ((left.T @ left - eye).square().sum() + (right @ right.T - eye).square().sum())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in fp32 with ``B @ A == delta_weight()``; triplets with sigma = 0 dropped."""
        with torch.no_grad():
            sigma = self.effective_singular_values().float()
            keep = sigma != 0
            return (self.lora_P.float()[:, keep] * sigma[keep]).contiguous(), self.lora_Q.float()[keep].contiguous()

    def effective_rank(self) -> int:
        """Number of triplets with a non-zero singular value."""
        return int((self.effective_singular_values() != 0).sum())


def budget_schedule(step: int, total_steps: int, initial: int, target: int, tinit: int, tfinal: int) -> int:
    """AdaLoRA's cubic budget ``b(t)`` (eq. 12), rounded down."""
    if step < tinit:
        return initial
    if step >= total_steps - tfinal:
        return target
    progress = (step - tinit) / (total_steps - tinit - tfinal)
    return int(target + (initial - target) * (1.0 - progress) ** 3)


@ADAPTERS.register(
    "adalora",
    family="dynamic_rank",
    paper="AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
    arxiv="2303.10512",
)
class AdaLoraLayer(SvdTripletLayer):
    """SVD-form update whose triplets are pruned to a global budget by smoothed importance."""

    OPTIONS = {"target_r": None, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85}

    def __init__(self, base: nn.Linear, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        if self.options["target_r"] is None:
            # The paper sets the initial budget to 1.5x the final one.
            self.options["target_r"] = max(1, (2 * self.rank) // 3)
        check_int(self, "target_r", 1, self.rank)
        check_int(self, "tinit", 0)
        check_int(self, "tfinal", 0)
        check_int(self, "deltaT", 1)
        check_unit_interval(self, "beta1")
        check_unit_interval(self, "beta2")
        self.scaling = self.alpha / self.rank
        self.register_buffer("rank_mask", torch.ones(self.rank, dtype=torch.bool, device=self.base.weight.device))
        for name in ("P", "lambda", "Q"):
            shape = getattr(self, f"lora_{name}").shape
            fp32 = {"device": self.base.weight.device, "dtype": torch.float32}
            self.register_buffer(f"importance_avg_{name}", torch.zeros(shape, **fp32), persistent=False)
            self.register_buffer(f"importance_unc_{name}", torch.zeros(shape, **fp32), persistent=False)
        self.final_mask_fixed = False

    def effective_singular_values(self) -> torch.Tensor:
        return self.lora_lambda * self.scaling

    def update_importance(self) -> None:
        beta1, beta2 = float(self.options["beta1"]), float(self.options["beta2"])
        with torch.no_grad():
            for name in ("P", "lambda", "Q"):
                param = getattr(self, f"lora_{name}")
                # A layer the loss did not reach this step (no gradient) has sensitivity 0.
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                current = (param.float() * grad.float()).abs()
                average = getattr(self, f"importance_avg_{name}")
                uncertainty = getattr(self, f"importance_unc_{name}")
                update_smoothed_importance(average, uncertainty, current, beta1, beta2)

    def triplet_scores(self) -> torch.Tensor:
        """``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` with ``s = Ibar * Ubar``."""
        score = {name: getattr(self, f"importance_avg_{name}") * getattr(self, f"importance_unc_{name}")
                 for name in ("P", "lambda", "Q")}
        return score["lambda"] + score["P"].mean(dim=0) + score["Q"].mean(dim=1)

    def allocated_rank(self) -> int:
        """Triplets kept by the current budget mask (``rank_mask``)."""
        return int(self.rank_mask.sum())

    def apply_mask(self, keep: torch.Tensor) -> None:
        with torch.no_grad():
            self.rank_mask.copy_(keep)
            self.lora_lambda.masked_fill_(~keep, 0.0)

    @staticmethod
    def mask_to_budget(layers: dict[str, AdaLoraLayer], budget: int) -> None:
        """Keep the ``budget`` triplets with the highest scores over all layers; zero the others' lambda."""
        scores = [layer.triplet_scores() for layer in layers.values()]
        flat = torch.cat([s.to(scores[0].device) for s in scores])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        for layer, part in zip(layers.values(), keep.split([s.numel() for s in scores])):
            layer.apply_mask(part.to(layer.rank_mask.device))

    @classmethod
    def after_step(cls, layers: dict[str, AdaLoraLayer], *, step: int, total_steps: int, optimizer: Any = None) -> None:
        first = next(iter(layers.values()))
        tinit, tfinal, delta_t = (int(first.options[k]) for k in ("tinit", "tfinal", "deltaT"))
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= tinit + tfinal:
            raise RankwiseError(
                f"adalora needs total_steps > tinit + tfinal ({tinit} + {tfinal}), got {total_steps!r}; "
                "lower tinit / tfinal or train longer"
            )
        refuse_merged(layers, "adalora")
        final_phase = step >= total_steps - tfinal
        if final_phase and all(layer.final_mask_fixed for layer in layers.values()):
            for layer in layers.values():
                layer.apply_mask(layer.rank_mask.clone())
            return
        if all(layer.lora_lambda.grad is None for layer in layers.values()):
            raise RankwiseError(
                "adalora's after_step reads the gradients but no adapter has one: call "
                "rankwise.adapters.after_step after optimizer.step() and before optimizer.zero_grad()"
            )
        for layer in layers.values():
            layer.update_importance()
        if final_phase or (step >= tinit and (step - tinit) % delta_t == 0):
            initial = sum(layer.rank for layer in layers.values())
            target = sum(int(layer.options["target_r"]) for layer in layers.values())
            cls.mask_to_budget(layers, budget_schedule(step, total_steps, initial, target, tinit, tfinal))
            if final_phase:
                for layer in layers.values():
                    layer.final_mask_fixed = True
