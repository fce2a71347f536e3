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

The SVD-form layer and the smoothed importance are in
:mod:`~rankwise.adapters.svd_triplet_family`, shared with IncreLoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.hooks import check_total_steps, refuse_merged
from rankwise.adapters.svd_triplet_family import SMOOTHING, SvdTripletLayer, update_smoothed_importance
from rankwise.errors import RankwiseError
from rankwise.options import Option


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
    supports=LINEAR_LIKE,
)
class AdaLoraLayer(SvdTripletLayer):
    """SVD-form update whose triplets are pruned to a global budget by smoothed importance."""

    OPTIONS = {
        "target_r": Option(
            None, int, low=1, nullable=True,
            help="final average rank per layer (at most rank); None = 2/3 of rank (the paper's 1.5x budget)",
        ),
        "tinit": Option(0, int, low=0, help="initial steps without pruning"),
        "tfinal": Option(0, int, low=0, help="final steps with the budget fixed"),
        "deltaT": Option(1, int, low=1, help="steps between budget allocations"),
        "beta1": SMOOTHING,
        "beta2": SMOOTHING,
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        if self.options["target_r"] is None:
            # The paper sets the initial budget to 1.5x the final one.
            self.options["target_r"] = max(1, (2 * self.rank) // 3)
        if self.options["target_r"] > self.rank:
            raise self.error(
                f"target_r {self.options['target_r']} is above the rank {self.rank} (the initial budget); lower it"
            )
        self.scaling = self.alpha / self.rank
        self.register_buffer("rank_mask", torch.ones(self.rank, dtype=torch.bool, device=self.factory["device"]))
        for name in ("P", "lambda", "Q"):
            shape = getattr(self, f"lora_{name}").shape
            fp32 = {"device": self.factory["device"], "dtype": torch.float32}
            self.register_buffer(f"importance_avg_{name}", torch.zeros(shape, **fp32), persistent=False)
            self.register_buffer(f"importance_unc_{name}", torch.zeros(shape, **fp32), persistent=False)
        self.final_mask_fixed = False

    def effective_singular_values(self) -> torch.Tensor:
        return self.lora_lambda * self.scaling

    def update_importance(self) -> None:
        beta1, beta2 = self.options["beta1"], self.options["beta2"]
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
        tinit, tfinal, delta_t = (first.options[k] for k in ("tinit", "tfinal", "deltaT"))
        remedy = "it must exceed tinit + tfinal: lower tinit / tfinal or train longer"
        check_total_steps(total_steps, tinit + tfinal + 1, "adalora", remedy)
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
            target = sum(layer.options["target_r"] for layer in layers.values())
            cls.mask_to_budget(layers, budget_schedule(step, total_steps, initial, target, tinit, tfinal))
            if final_phase:
                for layer in layers.values():
                    layer.final_mask_fixed = True
