"""The intrinsic dimension of fine-tuning a model on a task: the smallest subspace that reaches 90%.

Li, Farkhoor, Liu & Yosinski 2018, "Measuring the Intrinsic Dimension of Objective Landscapes",
arXiv 1804.08838; Aghajanyan, Zettlemoyer & Gupta 2021, "Intrinsic Dimensionality Explains the
Effectiveness of Language Model Fine-Tuning", arXiv 2012.13255.

The model is fine-tuned only along ``theta0 + P theta_d`` (the ``said`` adapter: a seeded
Fastfood or sparse projection of one ``d``-dimensional vector into every linear layer, with
SAID's per-layer scalars by default) for each ``d`` of a sweep, and once in full (every
parameter, AdamW) as the reference. With ``L0`` the evaluation loss of the base model,
``L_full`` that of full fine-tuning and ``L_d`` that of the subspace run,

    gain(d) = L0 - L_d,      d_t = min { d swept : gain(d) >= t (L0 - L_full) }

with ``t`` = ``threshold`` (0.9: the papers' ``d90``). Every run starts from a copy of the
given model (left untouched), trains ``steps`` steps on the training batches in order
(cycled) with rankwise's training loop (:func:`rankwise.training.train`) and is scored by
:func:`rankwise.training.evaluate` on the evaluation batches.

Deviations: the papers measure performance by task accuracy (``d90`` reaches 90% of full
fine-tuning's accuracy); here it is the evaluation loss's reduction from the base model, which
every causal-LM batch defines. The resolution of ``d`` is that of the sweep (the papers sweep
a grid too). The subspace covers the linear layers (the ``said`` adapter's targets), not
biases, norms or embeddings.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.adapters import method_options as adapter_options
from rankwise.analyze.core import DIAGNOSTICS, TrainingDiagnostic
from rankwise.errors import RankwiseError
from rankwise.options import Option

DIMENSIONS = Option((16, 64, 256, 1024, 4096), tuple, item=int, low=1,
                    help="the subspace dimensions d swept, strictly ascending")
THRESHOLD = Option(0.9, float, low=0, high=1, low_open=True,
                   help="share t of full fine-tuning's eval-loss reduction d must reach (0.9: d90)")
STEPS = Option(100, int, low=1, help="optimizer steps of every run (subspace and full)")
LR = Option(3e-3, float, low=0, low_open=True, help="Adam learning rate of the subspace runs")
FULL_LR = Option(3e-4, float, low=0, low_open=True, help="AdamW learning rate of the full fine-tuning reference")
#: the subspace's own options, as the said adapter declares them
PROJECTION, LAYER_SCALARS, SEED = (adapter_options("said")[name] for name in ("projection", "layer_scalars", "seed"))


@dataclass(frozen=True)
class IntrinsicDimension:
    """The sweep: ``dimension`` (the smallest ``d`` reaching ``threshold``, None if none did; ``float()``
    gives it, NaN for None), the base / full fine-tuning / per-``d`` evaluation losses."""

    dimension: int | None
    threshold: float
    base_loss: float
    full_loss: float
    losses: dict[int, float] = field(default_factory=dict)

    def gain(self, d: int) -> float:
        """``(L0 - L_d) / (L0 - L_full)``: the share of full fine-tuning's reduction that ``d`` reached."""
        return (self.base_loss - self.losses[d]) / (self.base_loss - self.full_loss)

    def __float__(self) -> float:
        return math.nan if self.dimension is None else float(self.dimension)


def _batches(value: Any, what: str) -> list[dict]:
    batches = list(value) if value is not None else []
    if not batches or not all(isinstance(b, dict) for b in batches):
        raise RankwiseError(f"{what} must be a non-empty list of batch dicts the model accepts (with labels), "
                            "e.g. from rankwise.data.batches")
    return batches


def _final_loss(model: nn.Module, optimizer: torch.optim.Optimizer, train: list[dict], evaluation: list[dict],
                steps: int) -> float:
    from rankwise.training import train as run

    return run(model, optimizer, itertools.cycle(train), steps=steps, eval_batches=evaluation).final_val_loss


def intrinsic_dimension(
    model: nn.Module,
    train_batches: list[dict],
    eval_batches: list[dict],
    *,
    dimensions: tuple[int, ...] = DIMENSIONS.default,
    threshold: float = THRESHOLD.default,
    steps: int = STEPS.default,
    lr: float = LR.default,
    full_lr: float = FULL_LR.default,
    projection: str = PROJECTION.default,
    layer_scalars: bool = LAYER_SCALARS.default,
    seed: int = SEED.default,
) -> IntrinsicDimension:
    """``d_t = min {d : L0 - L_d >= t (L0 - L_full)}`` over ``dimensions`` (see the module docstring).

    ``model`` is a model without adapters, left unchanged (every run trains a copy); the batches
    are dicts it accepts, with ``labels``. Raises RankwiseError when full fine-tuning does not
    lower the evaluation loss (nothing to reach: more ``steps`` or another ``full_lr``)."""
    options = IntrinsicDimensionDiagnostic(
        dimensions=dimensions, threshold=threshold, steps=steps, lr=lr, full_lr=full_lr, projection=projection,
        layer_scalars=layer_scalars, seed=seed).options
    return _sweep(model, train_batches, eval_batches, options)


def _sweep(model: nn.Module, train_batches: Any, eval_batches: Any, options: dict[str, Any]) -> IntrinsicDimension:
    from rankwise.adapters import adapt, adapter_names
    from rankwise.training import evaluate

    dims = options["dimensions"]
    if list(dims) != sorted(set(dims)):
        raise RankwiseError(f"dimensions must be strictly ascending, got {list(dims)}")
    if adapter_names(model):
        raise RankwiseError("intrinsic_dimension needs the plain model: it holds adapters "
                            f"({', '.join(adapter_names(model))}); pass rankwise.unload(model) or the base model")
    train, evaluation = _batches(train_batches, "train_batches"), _batches(eval_batches, "eval_batches")
    steps = options["steps"]
    base_loss = evaluate(model, evaluation)

    full = copy.deepcopy(model)
    for p in full.parameters():
        p.requires_grad_(p.is_floating_point())
    full_loss = _final_loss(full, torch.optim.AdamW(full.parameters(), lr=options["full_lr"]), train, evaluation,
                            steps)
    del full
    reachable = base_loss - full_loss
    if not reachable > 0:
        raise RankwiseError(f"full fine-tuning did not lower the evaluation loss ({base_loss:.4g} -> {full_loss:.4g}); "
                            "there is no gain to reach: raise steps or change full_lr")

    losses: dict[int, float] = {}
    found = None
    for d in dims:
        subspace = adapt(copy.deepcopy(model), "said", rank=d, projection=options["projection"],
                         layer_scalars=options["layer_scalars"], seed=options["seed"])
        trainable = [p for p in subspace.parameters() if p.requires_grad]
        losses[d] = _final_loss(subspace, torch.optim.Adam(trainable, lr=options["lr"]), train, evaluation, steps)
        del subspace
        if found is None and base_loss - losses[d] >= options["threshold"] * reachable:
            found = d
    return IntrinsicDimension(found, options["threshold"], base_loss, full_loss, losses)


@DIAGNOSTICS.register(
    "intrinsic_dimension",
    family="training",
    paper="Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning",
    arxiv="2012.13255",
)
class IntrinsicDimensionDiagnostic(TrainingDiagnostic):
    """``d_t`` of a model on a task from a sweep of subspace fine-tuning runs (None when no ``d`` reaches it)."""

    OPTIONS = {
        "dimensions": DIMENSIONS, "threshold": THRESHOLD, "steps": STEPS, "lr": LR, "full_lr": FULL_LR,
        "projection": PROJECTION, "layer_scalars": LAYER_SCALARS, "seed": SEED,
    }

    def measure(self, model: Any, train_batches: list[dict], eval_batches: list[dict]) -> float | None:
        return _sweep(model, train_batches, eval_batches, self.options).dimension
