"""The ``pretrain`` suite: every pretraining method from a fresh random model, tuned the same way.

From a fresh random tiny LLaMA on the embedded pretraining split (stdlib code). The rows:
AdamW, the low-rank gradient optimizers (GaLore, Fira, APOLLO, APOLLO-Mini, FRUGAL, DCT) on
every parameter, and the parametrisations (Low-Rank ``W = B A``, LoRA and ReLoRA on a frozen
random ``W``, SLTrain, LOST, structured FFN, Monarch, SST) trained by AdamW. Shared settings,
the published ones where they carry over: rank = half the width (the 60M model's 128 / 256),
subspace refresh every quarter of the run (the 200 of ~10k published steps is 2%; a quarter
is what lets a 200-step run refresh at all), GaLore scale 0.25, LoRA-style scale ``alpha / r``
= 0.25 (the releases' 32 / 128), Adam with eps 1e-6 and no weight decay for every row.

``rankwise bench --suite pretrain`` runs the honest comparison (:data:`SWEEP`, in
:mod:`rankwise.bench.sweep`): one shared learning-rate grid for every row, the lr chosen on a
held-out half of the validation stream, the chosen lr repeated over three seeds, the report
perplexity (the other half) as mean +- std beside the published 60M column, and the published
orderings tested against the seed noise. The plain ``rankwise bench`` runs the ``default``
rows with the learning rates that sweep chose (:data:`SWEPT_LR`); regenerate them with
``rankwise bench --suite pretrain`` (it prints the literal to paste here).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rankwise.bench.runner import RunConfig
from rankwise.bench.setup import SetUp, StepFraction
from rankwise.bench.sweep import SweepConfig

#: the embedded corpus split it trains on, and whether set-ups start from the cached base
WORKLOAD = ("pretrain", False)


class Steps(StepFraction):
    """A fraction of the run's steps, at least one step (a short ``--steps`` must not give 0)."""

    def resolve(self, steps: int) -> int:
        return max(1, super().resolve(steps))


#: Adam as rankwise.optim's AdamW has it (eps 1e-6, no weight decay) for the parametrisation rows
_ADAM = {"eps": 1e-6, "weight_decay": 0.0}
_HALF = 0.5  # rank = half the model width
_GAP = {"update_proj_gap": Steps(0.25)}

#: Chosen by ``rankwise bench --suite pretrain`` (preset quick: tiny LLaMA, 200 steps of 8 x 64 tokens,
#: grid 1e-3, 3e-3, 1e-2, extended by the sweep to 3.3e-4 / 3.3e-2 for the rows whose best sat at an end,
#: selection on the first validation half, seed 0); regenerate with that command, which prints this literal.
SWEPT_LR: dict[str, float] = {
    "adamw": 1e-3,
    "galore": 1e-2,
    "fira": 3e-3,
    "apollo": 3e-3,
    "apollo_mini": 3e-3,
    "frugal": 3e-3,
    "dct": 3e-3,
    "low-rank W=BA": 1e-3,
    "lora (pretraining)": 3e-3,
    "relora": 3e-3,
    "sltrain": 3e-3,
    "lost": 1e-3,
    "structured_ffn": 1e-3,
    "monarch": 3e-3,
    "sst": 3e-3,
}

_ROWS: list[SetUp] = [
    SetUp("adamw", "optim", "adamw"),
    SetUp("galore", "optim", "galore", rank_fraction=_HALF, options={**_GAP, "scale": 0.25}),
    SetUp("fira", "optim", "fira", rank_fraction=_HALF, options=dict(_GAP), default=False),
    SetUp("apollo", "optim", "apollo", rank_fraction=_HALF, options=dict(_GAP), default=False),
    SetUp("apollo_mini", "optim", "apollo_mini", options=dict(_GAP), default=False),
    SetUp("frugal", "optim", "frugal", options=dict(_GAP), default=False),
    SetUp("dct", "optim", "dct", rank_fraction=_HALF, options=dict(_GAP), default=False),
    SetUp("low-rank W=BA", "parametrize", "lowrank", rank_fraction=_HALF, optimizer_options=_ADAM),
    SetUp("lora (pretraining)", "parametrize", "relora", rank_fraction=_HALF, optimizer_options=_ADAM, default=False,
          options={"restart_every": None, "alpha": 16.0}),
    SetUp("relora", "parametrize", "relora", rank_fraction=_HALF, optimizer_options=_ADAM, default=False,
          options={"restart_every": Steps(0.25), "restart_warmup_steps": Steps(0.025), "alpha": 16.0}),
    SetUp("sltrain", "parametrize", "sltrain", rank_fraction=_HALF, optimizer_options=_ADAM, default=False,
          options={"alpha": 16.0}),
    SetUp("lost", "parametrize", "lost", rank_fraction=_HALF, optimizer_options=_ADAM, default=False),
    SetUp("structured_ffn", "parametrize", "structured_ffn", rank_fraction=_HALF, optimizer_options=_ADAM,
          default=False),
    SetUp("monarch", "parametrize", "monarch", optimizer_options=_ADAM, default=False),
    SetUp("sst", "parametrize", "sst", rank_fraction=_HALF, optimizer_options=_ADAM, default=False,
          options={"resample_every": Steps(0.1)}),
]

#: the rows with their swept learning rates (what the plain ``rankwise bench`` runs, ``default`` ones only)
SETUPS: list[SetUp] = [replace(row, lr=SWEPT_LR[row.name]) for row in _ROWS]

#: the published validation perplexity of LLaMA-60M on C4 (../shared/specs/optimizers.md), where reported
PUBLISHED_60M: dict[str, float] = {
    "adamw": 34.06, "low-rank W=BA": 78.18, "lora (pretraining)": 34.99, "relora": 37.04, "galore": 34.88,
    "fira": 31.06,
    "apollo": 31.55, "apollo_mini": 31.93,
}

#: the published orderings tested against the seed noise, ``(better, worse)``
ORDERINGS: list[tuple[str, str]] = [
    ("fira", "adamw"), ("apollo", "adamw"), ("apollo_mini", "adamw"), ("adamw", "galore"),
    ("galore", "lora (pretraining)"),
    ("lora (pretraining)", "low-rank W=BA"), ("lora (pretraining)", "relora"),
]

#: ``rankwise bench --suite pretrain``: preset -> the sweep
SWEEP: dict[str, SweepConfig] = {
    "quick": SweepConfig("tiny", RunConfig(steps=200, batch_size=8, seq_len=64, eval_every=50, eval_batches=8,
                                           warmup_steps=10, early_step=50),
                         lr_grid=(1e-3, 3e-3, 1e-2)),
    # the small model (13.7M parameters), one seed: 45 runs of 150 steps -- over an hour on 2 CPU cores
    # (see docs/benchmarks.md), minutes on a GPU
    "full": SweepConfig("small", RunConfig(steps=150, batch_size=8, seq_len=128, eval_every=50, eval_batches=8,
                                           warmup_steps=10, early_step=50),
                        lr_grid=(1e-3, 3e-3, 1e-2), seeds=(0,)),
}

#: printed under the plain ``rankwise bench`` table of this suite
NOTE = ("pretrain learning rates: each set-up's lr is the one `rankwise bench --suite pretrain` chose for it "
        "(shared grid, held-out selection, preset quick: 200 steps of 8 x 64 tokens); that command also runs "
        "every method over 3 seeds.")


def sweep_setups(names: list[str] | None = None) -> list[SetUp]:
    """The rows the sweep trains (all, or those named); their lr is the grid's, not :data:`SWEPT_LR`."""
    if not names:
        return list(_ROWS)
    known = {row.name: row for row in _ROWS}
    return [known[name] for name in names]


def describe(config: SweepConfig) -> dict[str, Any]:
    return {"model": config.model_preset, "steps": config.run.steps, "batch": config.run.batch_size,
            "seq_len": config.run.seq_len, "lr_grid": list(config.lr_grid), "seeds": list(config.seeds)}
