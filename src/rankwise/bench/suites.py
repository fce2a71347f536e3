"""The benchmark suites: tables of set-ups trained side by side on the same data and seed.

A set-up names one way to train (a pillar and a registered method with its options). Adding
a method to the benchmark is one row here. A plain ``rankwise bench`` runs the
``default=True`` rows of the pretrain and finetune suites; naming a suite (``--suite``) or
``--preset full`` runs all its rows, ``--setups`` exactly the rows named.

Suites:
- ``pretrain``: from a fresh random model on the embedded pretraining split (stdlib code).
- ``finetune``: from the cached base checkpoint on the shifted split (documentation prose).
- ``optim``: the low-rank gradient optimizers against AdamW on the pretraining workload, each
  next to its reference package (kind ``reference``: galore-torch, fira, apollo-torch, built
  by :mod:`rankwise.bench.references` for the same set-up; skipped with a note when not
  installed).
- ``compress``: from the cached base on the pretraining split: the base compressed at a ratio
  then trained on (the recovery a compressed model gets), against the dense base trained the
  same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rankwise.errors import RankwiseError

@dataclass(frozen=True)
class StepFraction:
    """An option given as a fraction of the run's steps (schedules such as AdaLoRA's tinit),
    so a suite row stays valid whatever ``--steps`` is."""

    fraction: float

    def resolve(self, steps: int) -> int:
        return int(round(self.fraction * steps))


@dataclass(frozen=True)
class SetUp:
    """One row of a suite.

    kind ``full``: AdamW on every parameter. ``optim``: ``rankwise.optim.build(name=method)``
    on every parameter. ``adapter``: ``rankwise.adapt(method)`` then AdamW on the adapter (or the optimizer the
    method names, or ``rankwise.optim.build`` with ``optimizer_options``).
    ``parametrize``: ``rankwise.pretrain.parametrize(method)`` then AdamW.
    ``reference``: a reference package's optimizer (``method`` names it in
    ``rankwise.bench.references.REFERENCES``) on the split ``optim`` uses.
    ``compress``: ``rankwise.compress(method, ratio=ratio)`` then AdamW on every parameter.
    ``rank`` is in model-width units: ``rank_fraction`` of the hidden size when ``rank`` is None.
    (``rankwise.bench.kinds.KINDS`` maps each kind to what it does.)
    """

    name: str
    kind: str
    method: str = "adamw"
    lr: float = 1e-3
    rank: int | None = None
    rank_fraction: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    default: bool = True
    #: extra ``rankwise.optim.build`` arguments for adapter set-ups (LoRA+'s ``loraplus_lr_ratio``)
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    #: compress set-ups: the fraction of the targeted layers' weights kept
    ratio: float | None = None

    def resolved_options(self, steps: int) -> dict[str, Any]:
        return {k: v.resolve(steps) if isinstance(v, StepFraction) else v for k, v in self.options.items()}

    def resolved_rank(self, hidden_size: int) -> int | None:
        if self.rank is not None:
            return self.rank
        if self.rank_fraction is not None:
            return max(1, int(round(self.rank_fraction * hidden_size)))
        return None


#: the optim suite's shared set-up: rank = half the width, refresh every 50 steps, each
#: method's own default scale (the reference rows take their counterpart's)
_OPTIM_SHARED: dict[str, Any] = {"lr": 1e-2, "rank_fraction": 0.5, "options": {"update_proj_gap": 50}}

SUITES: dict[str, list[SetUp]] = {
    "pretrain": [
        SetUp("adamw", "full", lr=3e-3),
        SetUp("galore", "optim", "galore", lr=1e-2, rank_fraction=0.5,
              options={"update_proj_gap": 50, "scale": 0.25}),
        SetUp("low-rank W=BA", "parametrize", "lowrank", lr=3e-3, rank_fraction=0.5),
    ],
    "optim": [
        SetUp("adamw", "optim", "adamw", lr=3e-3),
        SetUp("galore", "optim", "galore", **_OPTIM_SHARED),
        SetUp("galore-torch GaLoreAdamW", "reference", "galore-torch", **_OPTIM_SHARED),
        SetUp("galore8bit", "optim", "galore8bit", **_OPTIM_SHARED),
        SetUp("qgalore", "optim", "qgalore", **_OPTIM_SHARED),
        SetUp("fira", "optim", "fira", **_OPTIM_SHARED),
        SetUp("fira FiraAdamW", "reference", "fira", **_OPTIM_SHARED),
        SetUp("apollo", "optim", "apollo", **_OPTIM_SHARED),
        SetUp("apollo-torch APOLLOAdamW", "reference", "apollo-torch", **_OPTIM_SHARED),
        SetUp("apollo_mini", "optim", "apollo_mini", lr=1e-2, options={"update_proj_gap": 50}),
        SetUp("dct", "optim", "dct", **_OPTIM_SHARED),
        SetUp("frugal", "optim", "frugal", lr=1e-2, options={"update_proj_gap": 50}),  # its blocks: density, no rank
        SetUp("gradnorm_lorp", "optim", "gradnorm_lorp", **_OPTIM_SHARED),
        SetUp("ldadam", "optim", "ldadam", **_OPTIM_SHARED),
    ],
    # Adapters at rank 8 on every Linear layer of the base; methods with only O(r) trainable
    # values per layer (loldu, svfit, lora_sb) take a larger learning rate, as their papers do.
    "finetune": [
        SetUp("full fine-tuning", "full", lr=3e-4),
        SetUp("lora", "adapter", "lora", lr=3e-3, rank=8),
        SetUp("lora+ (ratio 16)", "adapter", "lora", lr=1e-3, rank=8, default=False,
              optimizer_options={"loraplus_lr_ratio": 16}),
        SetUp("lora_pro", "adapter", "lora_pro", lr=3e-3, rank=8, default=False),
        SetUp("lora_ggpo", "adapter", "lora_ggpo", lr=3e-3, rank=8, default=False),
        SetUp("pissa", "adapter", "pissa", lr=3e-3, rank=8),
        SetUp("pissa (niter 4)", "adapter", "pissa", lr=3e-3, rank=8, options={"niter": 4}, default=False),
        SetUp("olora", "adapter", "olora", lr=3e-3, rank=8, default=False),
        SetUp("loldu", "adapter", "loldu", lr=3e-2, rank=8, default=False),
        SetUp("svfit", "adapter", "svfit", lr=3e-2, rank=8, default=False),
        SetUp("sorsa", "adapter", "sorsa", lr=3e-3, rank=8, default=False),
        SetUp("corda (ipm)", "adapter", "corda", lr=3e-3, rank=8, options={"mode": "ipm"}, default=False),
        SetUp("corda (kpm)", "adapter", "corda", lr=3e-3, rank=8, options={"mode": "kpm"}, default=False),
        SetUp("eva", "adapter", "eva", lr=3e-3, rank=8, default=False),
        SetUp("lora_ga", "adapter", "lora_ga", lr=3e-3, rank=8, default=False),
        SetUp("lora_sb", "adapter", "lora_sb", lr=3e-2, rank=8, default=False),
        SetUp("dylora", "adapter", "dylora", lr=3e-3, rank=8, options={"frozen": False}, default=False),
        SetUp("adalora (12 -> 8)", "adapter", "adalora", lr=3e-3, rank=12,
              options={"target_r": 8, "tinit": StepFraction(0.1), "tfinal": StepFraction(0.2), "deltaT": 5},
              default=False),
        SetUp("increlora (capacity 12)", "adapter", "increlora", lr=3e-3, rank=12,
              options={"init_r": 2, "target_r": 8, "incre_interval": 10}, default=False),
        SetUp("sora (r_max 8)", "adapter", "sora", lr=3e-3, rank=8, default=False),
    ],
    # The base compressed then trained on the split it was pretrained on, next to the dense
    # base trained the same way: what recovery training buys back at each ratio.
    "compress": [
        SetUp("dense base", "full", lr=3e-4),
        SetUp("svd 80%", "compress", "svd", lr=3e-4, ratio=0.8),
        SetUp("svd 50%", "compress", "svd", lr=3e-4, ratio=0.5),
    ],
}


def select_setups(suite: str, names: list[str] | None, include_all: bool) -> list[SetUp]:
    """The set-ups of ``suite`` to run: those named, else the default ones (or all)."""
    if suite not in SUITES:
        raise RankwiseError(f"unknown suite {suite!r}; known: {', '.join(sorted(SUITES))}")
    table = SUITES[suite]
    if names:
        known = {s.name: s for s in table}
        missing = [n for n in names if n not in known]
        if missing:
            raise RankwiseError(f"suite {suite!r} has no set-up {missing}; it has: {', '.join(known)}")
        return [known[n] for n in names]
    return [s for s in table if include_all or s.default]
