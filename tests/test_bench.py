"""Every set-up of every bench suite runs and is measured the same way (tiny model, 3 steps)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_llama
from rankwise.bench.runner import RunConfig, Workload, run_setup
from rankwise.bench.suites import SUITES
from rankwise.data.batches import eval_batches

CONFIG = RunConfig(steps=3, batch_size=2, seq_len=16, eval_every=3, eval_batches=2, warmup_steps=0, early_step=1)
ROWS = [(suite, setup) for suite, table in SUITES.items() for setup in table]


def workload() -> Workload:
    tokens = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(0))
    held_out = eval_batches(tokens[-512:], batch_size=2, seq_len=16, max_batches=2)
    # hidden 32 makes the suites' rank fractions small enough for the tiny fixture
    return Workload("tiny fixture", lambda: make_llama(hidden=32), tokens[:-512], held_out, hidden_size=32)


@pytest.mark.parametrize("suite, setup", ROWS, ids=[f"{suite}:{setup.name}" for suite, setup in ROWS])
def test_setup_trains_and_reports_every_column(suite, setup):
    if setup.kind == "reference":
        from rankwise.bench.references import REFERENCES

        pytest.importorskip(REFERENCES[setup.method].module)
    if setup.rank is not None and setup.rank > 16:
        setup = type(setup)(**{**setup.__dict__, "rank": 8})
    row, model = run_setup(setup, workload(), CONFIG)
    assert row["setup"] == setup.name
    assert 0 < row["trainable_params"] <= sum(p.numel() for p in model.parameters())
    assert row["optimizer_state_mb"] > 0 and row["peak_memory_mb"] > 0 and row["ms_per_step"] > 0
    assert math.isfinite(row["final_val_loss"])
    assert row["history"][-1]["step"] == CONFIG.steps
