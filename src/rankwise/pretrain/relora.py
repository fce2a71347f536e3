"""ReLoRA: LoRA merged into the weights and restarted every k steps.

Lialin, Muckatira, Shivagunde, Rumshisky, "ReLoRA: High-Rank Training Through Low-Rank
Updates" (also published as "Stack More Layers Differently"), arXiv 2307.05695. Each
targeted ``out x in`` layer becomes

    y = W x + b + s B A dropout(x),   s = alpha / r,  A: r x in,  B: out x r,

with ``W`` frozen and ``A``, ``B`` trained (``r (m + n)`` trainable weights per layer). Every
``restart_every`` steps (after the step, :meth:`ReLoRA.after_step`) the update is merged and
the factors restart as LoRA starts:

    W <- W + s B A,   A <- Kaiming-uniform(a = sqrt(5)),   B <- 0,

so the merged model computes exactly what it computed before the restart, and the sum of
the low-rank updates can reach high rank. At each restart the optimizer state of ``A`` and
``B`` is partially reset by magnitude pruning (the paper's "partial reset"): in each Adam
moment tensor the ``optimizer_pruning`` fraction of entries with the smallest magnitude is set
to zero (0.99 as in the paper; 1.0 resets it entirely). The learning rate follows the jagged
cosine schedule (:meth:`ReLoRA.schedule`, :func:`rankwise.pretrain.schedules.jagged_cosine_schedule`):
zero at every restart, re-warmed over ``restart_warmup_steps``. ``warm_start_steps`` > 0 trains
the dense ``W`` alone for that many steps first (the paper's full-rank warm start; the LoRA
branch is off and its factors get no gradient), then freezes it, drops its optimizer state
and switches to ReLoRA. ``restart_every=None`` is plain LoRA on a frozen random ``W`` (the
"LoRA" pretraining baseline of the GaLore paper, arXiv 2403.03507).

Defaults follow the authors' release (github.com/Guitaricet/relora): ``alpha`` 32,
dropout 0.1 on the LoRA branch, Kaiming-uniform ``A`` / zero ``B``, restarts every 5000 steps
with a 100-step re-warm-up, min learning-rate ratio 0.1. Deviations: the release zeroes
``A`` as well before the first restart when it keeps the original weights (so the first
cycle trains nothing through LoRA); here every cycle starts as LoRA does. The release's
magnitude pruning thresholds at ``torch.quantile``; here the threshold is the
``floor(p * numel)``-th smallest magnitude (identical up to quantile interpolation). The
release's default optimizer reset is a 99.9% random prune; the paper's and ours is magnitude
pruning.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.options import Option
from rankwise.pretrain.core import (
    PARAMETRISATIONS,
    DenseLayer,
    Parametrisation,
    ParametrisedLayer,
    bias_parameter,
    reset_optimizer_state,
    transform_moments,
)
from rankwise.pretrain.schedules import jagged_cosine_schedule


class ReLoRALinear(ParametrisedLayer, nn.Module):
    """``y = W x + b + s B A dropout(x)`` with ``W`` frozen (trainable during a warm start)."""

    def __init__(self, layer: DenseLayer, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, rank
        self.scaling = alpha / rank
        like = {"device": layer.device, "dtype": layer.dtype}
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = bias_parameter(layer)
        self.lora_A = nn.Linear(layer.in_features, rank, bias=False, **like)
        self.lora_B = nn.Linear(rank, layer.out_features, bias=False, **like)
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_active = True

    def reset_factors(self, generator: torch.Generator | None) -> None:
        """LoRA's start: ``A`` Kaiming-uniform (bound ``1 / sqrt(in)``), ``B = 0``."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on an in-wide fan-in
            draw = torch.rand(self.lora_A.weight.shape, generator=generator) * (2 * bound) - bound
            self.lora_A.weight.copy_(draw)
            self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_active:
            out = out + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))
        return out

    def dense_weight(self) -> torch.Tensor:
        if not self.lora_active:
            return self.weight
        return self.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge_and_restart(self, generator: torch.Generator | None) -> None:
        """``W <- W + s B A`` then restart the factors (the output is unchanged: ``B = 0``)."""
        self.weight.add_(self.scaling * (self.lora_B.weight @ self.lora_A.weight))
        self.reset_factors(generator)

    def end_warm_start(self, optimizer: Any) -> None:
        """Freeze ``W`` (dropping its gradient and optimizer state) and switch the LoRA branch on."""
        self.weight.requires_grad_(False)
        self.weight.grad = None
        reset_optimizer_state(optimizer, [self.weight])
        self.lora_active = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def magnitude_prune(tensor: torch.Tensor, fraction: float) -> torch.Tensor:
    """``tensor`` with its ``floor(fraction * numel)`` smallest-magnitude entries set to zero."""
    count = int(fraction * tensor.numel())
    if count <= 0:
        return tensor
    if count >= tensor.numel():
        return torch.zeros_like(tensor)
    magnitude = tensor.abs().flatten().float()
    threshold = magnitude.kthvalue(count).values
    return tensor * (tensor.abs().float() > threshold).to(tensor.dtype)


@PARAMETRISATIONS.register(
    "relora",
    family="lora",
    paper="ReLoRA: High-Rank Training Through Low-Rank Updates",
    arxiv="2307.05695",
)
class ReLoRA(Parametrisation):
    """LoRA on a frozen ``W``, merged and restarted every ``restart_every`` steps (module docstring)."""

    zero_factor_at_init = True  # B = 0, as LoRA
    OPTIONS = {
        "alpha": Option(32.0, float, low=0, low_open=True, help="LoRA scale numerator: the update is (alpha / r) B A"),
        "dropout": Option(0.1, float, low=0, high=1, high_open=True, help="dropout on the LoRA branch's input"),
        "restart_every": Option(5000, int, low=1, nullable=True,
                                help="steps between merge-and-restarts; None = plain LoRA (no restart)"),
        "restart_warmup_steps": Option(100, int, low=0,
                                       help="steps over which the jagged schedule re-warms the lr after a restart"),
        "optimizer_pruning": Option(0.99, float, low=0, high=1,
                                    help="fraction of each Adam moment of A and B zeroed (smallest magnitudes) "
                                         "at a restart; 1.0 = full reset"),
        "warm_start_steps": Option(0, int, low=0,
                                   help="steps of full-rank training of W before ReLoRA starts (0 = none, as "
                                        "in the GaLore paper's comparison)"),
        "seed": Option(None, int, nullable=True,
                       help="seed of the factors' draws; None = torch's global RNG, as the model's init"),
    }

    def __init__(self, rank: int | None = None, **options: Any) -> None:
        super().__init__(rank, **options)
        seed = self.options["seed"]
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def layer_types(self) -> tuple[type, ...]:
        return (ReLoRALinear,)

    def build(self, layer: DenseLayer) -> ReLoRALinear:
        module = ReLoRALinear(layer, self.rank, self.options["alpha"], self.options["dropout"])
        module.reset_factors(self.generator)
        if self.options["warm_start_steps"]:
            module.weight.requires_grad_(True)
            module.lora_active = False
        return module

    def is_restart(self, step: int, total_steps: int) -> bool:
        every, warm = self.options["restart_every"], self.options["warm_start_steps"]
        return every is not None and warm < step < total_steps and (step - warm) % every == 0

    def after_step(self, model: nn.Module, *, step: int, total_steps: int, optimizer: Any) -> None:
        warm = self.options["warm_start_steps"]
        if warm and step == warm:
            for layer in self.layers(model).values():
                layer.end_warm_start(optimizer)
        elif self.is_restart(step, total_steps):
            fraction = self.options["optimizer_pruning"]
            for layer in self.layers(model).values():
                layer.merge_and_restart(self.generator)
                for parameter in (layer.lora_A.weight, layer.lora_B.weight):
                    transform_moments(optimizer, parameter, lambda moment: magnitude_prune(moment, fraction))

    def schedule(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int) -> Any:
        every = self.options["restart_every"]
        rewarm = self.options["restart_warmup_steps"] if every is None else min(self.options["restart_warmup_steps"],
                                                                                every)
        return jagged_cosine_schedule(
            optimizer, total_steps=total_steps, warmup_steps=warmup_steps, restart_every=every,
            restart_warmup_steps=rewarm, restarts_from=self.options["warm_start_steps"],
        )
