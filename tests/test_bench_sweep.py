"""The learning-rate sweep and seed repeats (rankwise.bench.sweep) and the pretrain suite's tables."""

from __future__ import annotations

import ast
import json
import math

import pytest
import torch

from conftest import make_llama
from rankwise.bench import run_bench
from rankwise.bench.runner import RunConfig, Workload
from rankwise.bench.setup import SetUp
from rankwise.bench.suites import pretrain as suite
from rankwise.bench.sweep import (
    SweepConfig,
    SweepRow,
    compare,
    format_sweep,
    run_key,
    run_sweep,
    split_validation,
    swept_defaults,
    train_one,
)
from rankwise.data.batches import eval_batches
from rankwise.errors import RankwiseError

TINY = SweepConfig("tiny", RunConfig(steps=3, batch_size=2, seq_len=16, eval_every=3, eval_batches=2, warmup_steps=0,
                                     early_step=1), lr_grid=(1e-3, 1e-2, 1e-1), seeds=(0, 1), eval_batches=2, workers=1,
                   max_extensions=0)


def fixture_workload(config: SweepConfig, seed: int):
    """A hidden-32 LLaMA on random tokens; the held-out stream cut in two as the embedded one is."""
    tokens = torch.randint(0, 128, (6000,), generator=torch.Generator().manual_seed(0))
    selection, report = split_validation(tokens[-1024:], config)
    workload = Workload("fixture", lambda: make_llama(seed=seed, hidden=32), tokens[:-1024], selection, hidden_size=32)
    return workload, report


def row_with(losses: dict[float, float], seeds: dict[int, float]) -> SweepRow:
    row = SweepRow(SetUp("x", "optim"))
    row.grid = {lr: {"selection_loss": loss} for lr, loss in losses.items()}
    row.seeds = {seed: {"report_loss": loss} for seed, loss in seeds.items()}
    return row


# ----- the choice and the comparisons --------------------------------------------------------------


def test_the_chosen_lr_minimises_the_selection_loss_and_a_grid_end_is_flagged():
    row = row_with({1e-3: 5.0, 3e-3: 4.2, 1e-2: float("nan")}, {})
    assert row.chosen_lr == 3e-3 and not row.at_edge  # a diverged (NaN) run is never chosen
    assert row_with({1e-3: 5.0, 3e-3: 4.2, 1e-2: 4.0}, {}).at_edge
    table = format_sweep([row])
    assert "4.2000*" in table and "5.0000 " in table and table.rstrip().endswith("0.003")


@pytest.mark.parametrize("better, worse, verdict", [
    ({0: 4.0, 1: 4.1, 2: 4.05}, {0: 4.2, 1: 4.3, 2: 4.24}, "holds"),
    ({0: 4.3, 1: 4.4, 2: 4.35}, {0: 4.2, 1: 4.3, 2: 4.24}, "reversed"),
    ({0: 4.0, 1: 4.4, 2: 4.1}, {0: 4.2, 1: 4.3, 2: 4.2}, "within noise"),  # the seeds disagree
    ({0: 4.0, 1: 4.0, 2: 4.0}, {0: 4.01, 1: 4.5, 2: 4.02}, "within noise"),  # same sign, gap < 2 standard errors
    ({0: 4.0}, {0: 5.0}, "within noise"),  # one seed cannot separate anything from noise
])
def test_orderings_are_claimed_only_when_every_seed_agrees_beyond_the_noise(better, worse, verdict):
    result = compare(row_with({}, better), row_with({}, worse))
    assert result["verdict"] == verdict
    gaps = [worse[s] - better[s] for s in better]
    assert result["loss_gap"] == pytest.approx(sum(gaps) / len(gaps))
    assert result["ppl_ratio"] == pytest.approx(math.exp(result["loss_gap"]))


def test_the_validation_halves_are_disjoint_windows_of_the_stream():
    tokens = torch.arange(2048)
    selection, report = split_validation(tokens, TINY)
    seen_selection = torch.cat([b["input_ids"].flatten() for b in selection])
    seen_report = torch.cat([b["input_ids"].flatten() for b in report])
    assert seen_selection.max() < 1024 <= seen_report.min()
    assert [b["input_ids"].shape for b in selection] == [b["input_ids"].shape for b in eval_batches(
        tokens[:1024], batch_size=2, seq_len=16, max_batches=2)]


# ----- a whole sweep on the fixture ---------------------------------------------------------------


def test_a_sweep_runs_the_grid_then_the_chosen_lr_on_every_seed_and_reads_back_its_cache(tmp_path):
    setups = [SetUp("adamw", "optim", "adamw"), SetUp("lowrank", "parametrize", "lowrank", rank=4)]
    log: list[str] = []
    rows = run_sweep(setups, TINY, cache=tmp_path, log=log.append, workload_factory=fixture_workload)
    for row in rows:
        assert sorted(row.grid) == list(TINY.lr_grid) and sorted(row.seeds) == [0, 1]
        assert row.seeds[0] is row.grid[row.chosen_lr] and row.seeds[1]["lr"] == row.chosen_lr
        for result in (*row.grid.values(), row.seeds[1]):
            assert math.isfinite(result["selection_loss"]) and math.isfinite(result["report_loss"])
            assert result["selection_loss"] != result["report_loss"]  # two different halves
        assert row.seeds[0]["report_loss"] != row.seeds[1]["report_loss"]  # another init and batch order
        summary = row.summary({"adamw": 34.06})
        assert summary["lr"] == row.chosen_lr and len(summary["seed_ppls"]) == 2
        assert summary["final_val_ppl"] == pytest.approx(sum(math.exp(x) for x in row.report_losses()) / 2)
    assert len(list(tmp_path.glob("*.json"))) == 2 * 3 + 2
    again: list[str] = []
    cached = run_sweep(setups, TINY, cache=tmp_path, log=again.append, workload_factory=fixture_workload)
    assert sum("cached" in line for line in again) == 2 * 3 + 2
    assert [r.summary() for r in cached] == [r.summary() for r in rows]


def test_the_grid_grows_past_an_end_the_best_lr_sits_at_by_the_same_rule_for_every_setup(monkeypatch):
    """Fake runs whose loss is (log lr - log optimum)^2: an optimum below the grid pulls it down, one
    value at a time (the grid's spacing), until the best lr is interior or the extensions run out."""
    import rankwise.bench.sweep as sweep

    optimum = {"low": 2e-4, "inside": 3e-3, "far": 1e-9}
    calls = []

    def fake_train_one(setup, lr, seed, config, workload_factory=None):
        calls.append((setup.name, lr, seed))
        loss = math.log(lr / optimum[setup.name]) ** 2 + 0.01 * seed
        return {"selection_loss": loss, "report_loss": loss, "lr": lr, "seed": seed, "ms_per_step": 1.0,
                "load_average": [None, None], "seconds": 0.0}

    monkeypatch.setattr(sweep, "train_one", fake_train_one)
    config = SweepConfig("tiny", TINY.run, lr_grid=(1e-3, 3e-3, 1e-2), seeds=(0, 1), workers=1, max_extensions=2)
    low, inside, far = run_sweep([SetUp(n, "optim") for n in optimum], config, log=lambda line: None,
                                 workload_factory=fixture_workload)
    assert sorted(low.grid) == pytest.approx([1e-3 / 9, 1e-3 / 3, 1e-3, 3e-3, 1e-2])
    assert low.chosen_lr == pytest.approx(1e-3 / 3) and not low.at_edge
    assert sorted(inside.grid) == [1e-3, 3e-3, 1e-2] and inside.chosen_lr == 3e-3
    assert len(far.grid) == 5 and far.at_edge and far.chosen_lr == pytest.approx(1e-3 / 9)  # flagged, not hidden
    assert [c for c in calls if c[2] == 1] == [(r.setup.name, r.chosen_lr, 1) for r in (low, inside, far)]


def test_a_diverging_lr_is_a_recorded_result_not_the_end_of_the_sweep(tmp_path):
    setup = SetUp("adamw", "optim", "adamw")
    config = SweepConfig("tiny", TINY.run, lr_grid=(1e-3, 1e-2, 1e6), seeds=(0, 1), eval_batches=2, workers=1,
                         max_extensions=0)
    log: list[str] = []
    (row,) = run_sweep([setup], config, cache=tmp_path, log=log.append, workload_factory=fixture_workload)
    diverged = row.grid[1e6]
    assert diverged["diverged_at_step"] >= 1 and diverged["selection_loss"] is None
    assert row.chosen_lr in (1e-3, 1e-2) and math.isfinite(row.grid[row.chosen_lr]["selection_loss"])
    assert any("adamw lr 1e+06 seed 0: diverged (non-finite loss at step" in line for line in log)
    assert "diverged" in format_sweep([row])
    again: list[str] = []
    run_sweep([setup], config, cache=tmp_path, log=again.append, workload_factory=fixture_workload)
    assert any("lr 1e+06 seed 0: cached, diverged" in line for line in again)
    # a seed that diverges at the chosen lr counts as an infinite loss, not a crash
    row.seeds[1] = dict(row.seeds[1], report_loss=None)
    assert row.report_losses()[1] == math.inf
    assert compare(row_with({1e-3: 1.0}, {0: 1.0, 1: 1.0}), row)["gap_stderr"] >= 0


def test_a_run_is_deterministic_and_its_cache_key_tracks_what_changes_it():
    setup = SetUp("adamw", "optim", "adamw")
    first = train_one(setup, 1e-2, 0, TINY, workload_factory=fixture_workload)
    second = train_one(setup, 1e-2, 0, TINY, workload_factory=fixture_workload)
    assert first["selection_loss"] == second["selection_loss"] and first["report_loss"] == second["report_loss"]
    key = run_key(setup, 1e-2, 0, TINY)
    assert key == run_key(SetUp("adamw", "optim", "adamw", lr=5.0, default=False), 1e-2, 0, TINY)
    assert len({key, run_key(setup, 3e-2, 0, TINY), run_key(setup, 1e-2, 1, TINY),
                run_key(SetUp("adamw", "optim", "adamw", options={"eps": 1e-8}), 1e-2, 0, TINY)}) == 4


def test_a_sweep_config_needs_three_increasing_lrs_and_a_seed():
    with pytest.raises(RankwiseError, match="at least 3 increasing values"):
        SweepConfig("tiny", TINY.run, lr_grid=(1e-3, 1e-2))
    with pytest.raises(RankwiseError, match="at least 3 increasing values"):
        SweepConfig("tiny", TINY.run, lr_grid=(1e-2, 1e-3, 3e-3))
    with pytest.raises(RankwiseError, match="at least one seed"):
        SweepConfig("tiny", TINY.run, lr_grid=(1e-3, 3e-3, 1e-2), seeds=())


def test_the_runner_trains_a_parametrisation_on_its_own_schedule():
    """ReLoRA restarting every 4 of 12 steps: the lr drops to a fraction of the envelope after each restart."""
    from rankwise.bench.runner import run_setup

    workload, _ = fixture_workload(TINY, 0)
    setup = SetUp("relora", "parametrize", "relora", lr=1e-2, rank=4,
                  options={"restart_every": 4, "restart_warmup_steps": 2, "alpha": 1.0})
    row, _ = run_setup(setup, workload, RunConfig(steps=12, batch_size=2, seq_len=16, eval_every=12, eval_batches=1,
                                                  warmup_steps=0, early_step=1))
    lrs = [record["lr"] for record in row["history"]]  # logged after scheduler.step: lrs[k] is step k + 2's lr
    assert lrs[3] < 0.6 * lrs[2] and lrs[7] < 0.6 * lrs[6] and lrs[4] > lrs[3]  # restarts after steps 4 and 8


# ----- the suite module: what the plain bench and `--suite pretrain` run ----------------------------


def test_the_suite_has_the_issue_methods_and_the_plain_bench_rows_use_the_swept_lr():
    wanted = {"adamw", "galore", "fira", "apollo", "apollo_mini", "frugal", "dct", "lowrank", "relora", "sltrain",
              "lost", "structured_ffn", "monarch", "sst"}
    assert {row.method for row in suite.sweep_setups()} == wanted | {"relora"}  # lora = relora without restarts
    assert [row.name for row in suite.sweep_setups()] == list(suite.SWEPT_LR)
    assert all(row.lr == suite.SWEPT_LR[row.name] for row in suite.SETUPS)
    assert {a for pair in suite.ORDERINGS for a in pair} | set(suite.PUBLISHED_60M) <= set(suite.SWEPT_LR)
    assert "rankwise bench --suite pretrain" in suite.NOTE and "rankwise bench --suite pretrain" in suite.__doc__
    literal = swept_defaults([row_with({1e-3: 4.0, 3e-3: 3.0, 1e-2: 5.0}, {})])
    assert ast.literal_eval(literal.split("=", 1)[1].strip()) == {"x": 3e-3}
    with pytest.raises(KeyError):
        suite.sweep_setups(["nope"])


@pytest.mark.slow
def test_bench_suite_pretrain_runs_the_sweep_on_the_embedded_corpus(rankwise_cache, one_thread, monkeypatch, tmp_path,
                                                                    capsys):
    monkeypatch.setitem(suite.SWEEP, "quick", TINY)
    results = run_bench(["pretrain"], out=tmp_path, setups=["galore", "lora (pretraining)"], every_setup=True, show_progress=False)
    printed = capsys.readouterr().out
    for text in ("pretrain sweep", "published 60M", "galore <= lora (pretraining): ", "SWEPT_LR: dict[str, float] = {",
                 "sweep wall time"):
        assert text in printed
    rows = {row["setup"]: row for row in results["pretrain"]}
    assert set(rows) == {"galore", "lora (pretraining)"} and rows["galore"]["published_60m"] == 34.88
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["setup"] for r in record["rows"]] == ["galore", "lora (pretraining)"] and record["config"]["lr_grid"] == [1e-3, 1e-2, 1e-1]
    assert record["orderings"][0]["better"] == "galore" and len(record["rows"][0]["seeds"]) == 2
    assert json.loads((tmp_path / "results.json").read_text())["suites"]["pretrain"][0]["setup"] == "galore"
    with pytest.raises(RankwiseError, match="no suite of pretrain has the set-up\\(s\\) nope"):
        run_bench(["pretrain"], out=tmp_path, setups=["nope"], every_setup=True, show_progress=False)
