"""Gradient rank along training: each layer's gradient stable and effective rank every k steps.

The observation behind GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", arXiv 2403.03507, section 3: the gradient of a reversible
network becomes low rank during training) and WeLore (Jaiswal et al., "From GaLore to WeLore:
How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients", arXiv 2407.11239: the
gradients of some layers saturate to low rank while others stay high rank).

:class:`GradientRankCallback` records, at step 1 and every ``every`` steps, for each
Linear-like layer ``targets`` selects whose weight has a gradient (``G``, read as ``out x
in`` like the weight), the stable rank ``||G||_F^2 / ||G||_2^2``, the RankMe effective rank
and ``||G||_F``. It plugs into

* the rankwise training loop as a :class:`~rankwise.training.TrainingHooks` (``after_step``:
  after the optimizer step, on the gradient it stepped on, clipped if clipping is on);
* the transformers ``Trainer`` as a ``TrainerCallback`` (``on_pre_optimizer_step``: after
  backward and clipping, before the step; the step recorded is ``state.global_step + 1``).

Optimizers that consume gradients inside backward (``layerwise=True``) leave none to read:
the callback then raises a RankwiseError at its first recording step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from rankwise.analyze.numerical_rank import stable_rank_of_spectrum
from rankwise.analyze.rankme import effective_rank_of_spectrum
from rankwise.errors import RankwiseError
from rankwise.layers import layer_kind
from rankwise.linalg.svd import svd
from rankwise.targets import Targets, match_targets
from rankwise.training import TrainingHooks


class GradientRankCallback(TrainingHooks, TrainerCallback):
    """Records gradient ranks; ``records`` holds one dict per (step, layer): ``step``, ``layer``,
    ``shape``, ``stable_rank``, ``effective_rank``, ``frobenius_norm``."""

    def __init__(self, every: int = 10, targets: Targets = "all-linear") -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise RankwiseError(f"every must be a positive integer (record every that many steps), got {every!r}")
        self.every = every
        self.targets = targets
        self.records: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    def record(self, model: nn.Module, step: int) -> None:
        """Measure every targeted layer's current gradient and append the rows for ``step``."""
        rows = []
        for name in match_targets(model, self.targets):
            module = model.get_submodule(name)
            grad = getattr(module.weight, "grad", None)
            if grad is None:
                continue
            grad = grad.detach()
            if layer_kind(module) == "conv1d":
                grad = grad.T  # Conv1D stores W^T; report the gradient in the weight's out x in form
            if not torch.isfinite(grad).all() or not grad.any():
                continue
            singular_values = svd(grad)[1]
            rows.append({
                "step": step,
                "layer": name,
                "shape": list(grad.shape),
                "stable_rank": stable_rank_of_spectrum(singular_values),
                "effective_rank": effective_rank_of_spectrum(singular_values),
                "frobenius_norm": float(singular_values.double().pow(2).sum().sqrt()),
            })
        if not rows:
            raise RankwiseError(
                f"no layer selected by targets {self.targets!r} has a non-zero gradient at step {step}: their weights "
                "are frozen, or the optimizer consumes gradients inside backward (layerwise); log gradient ranks "
                "with a plain optimizer and trainable weights"
            )
        self.records.extend(rows)

    # ----- the rankwise training loop
    def after_step(self, model: nn.Module, *, step: int, total_steps: int, optimizer: Any) -> None:
        if self.due(step):
            self.record(model, step)

    # ----- the transformers Trainer
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if self.due(step):
            model = kwargs.get("model")
            if model is None:
                raise RankwiseError("the Trainer passed no model to the callback")
            self.record(model, step)
        return control

    # ----- results
    def summary(self) -> list[dict[str, Any]]:
        """Per layer: first and last recorded step, stable and effective rank there, and their means."""
        by_layer: dict[str, list[dict[str, Any]]] = {}
        for row in self.records:
            by_layer.setdefault(row["layer"], []).append(row)
        out = []
        for layer, rows in by_layer.items():
            first, last = rows[0], rows[-1]
            out.append({
                "layer": layer, "shape": first["shape"], "first_step": first["step"], "last_step": last["step"],
                "stable_rank_first": first["stable_rank"], "stable_rank_last": last["stable_rank"],
                "stable_rank_mean": sum(r["stable_rank"] for r in rows) / len(rows),
                "effective_rank_first": first["effective_rank"], "effective_rank_last": last["effective_rank"],
                "effective_rank_mean": sum(r["effective_rank"] for r in rows) / len(rows),
            })
        return out

    def format_summary(self) -> str:
        """A text table of :meth:`summary`."""
        lines = [f"{'layer':<44} {'shape':>11} {'stable rank first->last':>24} {'effective rank first->last':>27}"]
        for row in self.summary():
            shape = "x".join(str(d) for d in row["shape"])
            lines.append(f"{row['layer']:<44} {shape:>11} "
                         f"{row['stable_rank_first']:>10.2f} -> {row['stable_rank_last']:<10.2f} "
                         f"{row['effective_rank_first']:>12.1f} -> {row['effective_rank_last']:<10.1f}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write ``{"every", "records", "summary"}`` as JSON to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"every": self.every, "records": self.records, "summary": self.summary()},
                                   indent=2))
        return path
