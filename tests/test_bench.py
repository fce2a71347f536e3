"""Every set-up of every bench suite runs and is measured the same way (tiny model, 3 steps);
each kind prepares what it says and installs its pillar's training-time hooks."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_llama, register_for_test
from rankwise.bench.kinds import DATA_BATCHES, KINDS, prepare
from rankwise.bench.runner import RunConfig, Workload, run_setup
from rankwise.bench.suites import SUITES, SetUp
from rankwise.compress import COMPRESSORS, plan_ranks
from rankwise.compress.svd import SVDCompressor
from rankwise.data.batches import eval_batches
from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear
from rankwise.pretrain import PARAMETRISATIONS
from rankwise.pretrain.lowrank import LowRank

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
    assert row["forward_ms"] > 0
    assert math.isfinite(row["final_val_loss"])
    assert row["history"][-1]["step"] == CONFIG.steps


# ----- the kind table and the training-time hooks ------------------------------------------


def test_every_kind_has_a_preparation_and_a_suite_row():
    used = {setup.kind for table in SUITES.values() for setup in table}
    assert used == set(KINDS), f"kinds without a suite row: {sorted(set(KINDS) - used)}; rows of unknown kinds: {sorted(used - set(KINDS))}"


def test_an_unknown_kind_is_refused_listing_the_known_ones():
    with pytest.raises(RankwiseError, match="unknown kind 'prune'; known: full, optim, reference, adapter"):
        prepare(SetUp("x", "prune"), make_llama(hidden=32), 32, None, 3)


def test_adapter_hooks_reach_the_loop_loss_term_and_rank_schedule():
    """AdaLoRA (rank 4 -> 2, pruning from step 0 every step): its orthogonality penalty is the
    loop's regulariser and its after_step cuts the budget, which only the hooks can do."""
    setup = SetUp("adalora", "adapter", "adalora", lr=1e-3, rank=4,
                  options={"target_r": 2, "tinit": 0, "tfinal": 0, "deltaT": 1})
    row, model = run_setup(setup, workload(), CONFIG)
    from rankwise.adapters import adapter_layers

    layers = adapter_layers(model).values()
    assert all("regularizer" in record and record["regularizer"] > 0 for record in row["history"])
    # b(T) = target_r * n at the last step (tfinal = 0): 2 of 4 triplets per layer on average
    assert sum(int(layer.rank_mask.sum()) for layer in layers) == 2 * len(layers)


class CountingLowRank(LowRank):
    """A test-only parametrisation that acts during training: counts its hook calls."""

    def __init__(self, rank, **options):
        super().__init__(rank, **options)
        self.steps_seen: list[tuple[int, int]] = []

    def loss_term(self, model):
        return 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad) + 0.125

    def after_step(self, model, *, step, total_steps, optimizer):
        self.steps_seen.append((step, total_steps))


def test_a_parametrisation_is_installed_as_a_training_hook(monkeypatch):
    register_for_test(monkeypatch, PARAMETRISATIONS, "counting", CountingLowRank)
    model = make_llama(hidden=32)
    prepared = prepare(SetUp("c", "parametrize", "counting", rank=4), model, 32, None, CONFIG.steps)
    (hook,) = prepared.hooks
    assert isinstance(hook, CountingLowRank) and isinstance(model.model.layers[0].mlp.up_proj, FactorizedLinear)
    from rankwise.training import train

    result = train(model, prepared.optimizer, workload().batches(CONFIG), steps=3, hooks=prepared.hooks)
    assert hook.steps_seen == [(1, 3), (2, 3), (3, 3)]
    assert [record["regularizer"] for record in result.history] == [0.125] * 3


def test_a_parametrisation_without_a_rank_is_refused_clearly():
    with pytest.raises(RankwiseError, match="needs a rank"):
        prepare(SetUp("lowrank", "parametrize", "lowrank"), make_llama(hidden=32), 32, None, 3)


class CalibratedProbe(SVDCompressor):
    """A test-only data-driven compressor: records the calibration rows it is given."""

    calibration = ("input_covariance",)
    counts: dict = {}

    def factorize(self, name, linear, rank, stats):
        type(self).counts[name] = stats.input_covariance.count
        return super().factorize(name, linear, rank, stats)


def test_the_compress_kind_factorises_at_the_ratio_and_trains_every_remaining_parameter(monkeypatch):
    register_for_test(monkeypatch, COMPRESSORS, "probe", CalibratedProbe, needs_data=True)
    data = workload()
    model = make_llama(hidden=32)
    plan = plan_ranks(model, 0.5)
    CalibratedProbe.counts = {}
    prepared = prepare(SetUp("p", "compress", "probe", ratio=0.5), model, 32, data.batches(CONFIG), CONFIG.steps)
    factorized = {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert factorized == plan.ranks
    # calibration: DATA_BATCHES batches of 2 x 16 tokens reached every layer
    assert CalibratedProbe.counts == {name: DATA_BATCHES * 2 * 16 for name in plan.ranks}
    trained = {id(p) for group in prepared.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters()} and prepared.hooks == ()
    with pytest.raises(RankwiseError, match="needs a ratio"):
        prepare(SetUp("p", "compress", "svd"), make_llama(hidden=32), 32, None, 3)


# ----- set-ups across suites, the optimizer of method set-ups, resuming, the report ---------------

from rankwise.bench import plan_setups  # noqa: E402
from rankwise.bench.report import format_table, results_figure, setup_style  # noqa: E402
from rankwise.bench.runner import Checkpointing  # noqa: E402


def test_named_setups_run_in_whichever_suite_has_them():
    plan = plan_setups(["pretrain", "finetune"], ["lora"], include_all=False)
    assert {suite: [s.name for s in setups] for suite, setups in plan.items()} == {"finetune": ["lora"]}
    plan = plan_setups(["pretrain", "finetune"], ["adamw", "lora", "pissa"], include_all=False)
    assert {suite: [s.name for s in setups] for suite, setups in plan.items()} == {
        "pretrain": ["adamw"], "finetune": ["lora", "pissa"]}
    with pytest.raises(RankwiseError, match="no suite of pretrain, finetune has the set-up\\(s\\) lorra; they have -- "
                                            "pretrain: adamw, galore, .*, lora \\(pretraining\\), .*; "
                                            "finetune: full fine-tuning, lora, "):
        plan_setups(["pretrain", "finetune"], ["lora", "lorra"], include_all=False)
    with pytest.raises(RankwiseError, match="unknown suite 'nope'"):
        plan_setups(["nope"], ["lora"], include_all=False)


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_setup_name_can_be_named_on_the_command_line(suite):
    """``--setups`` splits on commas: a name holding one could never be selected."""
    names = [setup.name for setup in SUITES[suite]]
    assert all("," not in name for name in names), names
    assert len(set(names)) == len(names)


def _adapter_optimizer(setup):
    model = make_llama(hidden=32)
    return prepare(setup, model, 32, None, 3).optimizer, model


def test_an_adapter_setup_trains_with_the_optimizer_it_names():
    optimizer, model = _adapter_optimizer(SetUp("lora", "adapter", "lora", rank=4))
    assert type(optimizer) is torch.optim.AdamW
    optimizer, _ = _adapter_optimizer(SetUp("lora", "adapter", "lora", rank=4, optimizer="galore",
                                            optimizer_options={"rank": 2, "update_proj_gap": 7}))
    assert type(optimizer).__name__ == "GaLoreAdamW"
    assert (optimizer.param_groups[0]["rank"], optimizer.param_groups[0]["update_proj_gap"]) == (2, 7)
    optimizer, model = _adapter_optimizer(SetUp("lora", "adapter", "lora", rank=4, lr=1e-3,
                                                optimizer_options={"loraplus_lr_ratio": 16}))
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 16e-3]
    with pytest.raises(RankwiseError, match="unknown optimizer 'nonexistent'"):
        _adapter_optimizer(SetUp("lora", "adapter", "lora", rank=4, optimizer="nonexistent"))
    with pytest.raises(RankwiseError, match="unknown option"):
        _adapter_optimizer(SetUp("lora", "adapter", "lora", rank=4, optimizer_options={"scale": 9.0}))
    # LoRA-Pro's paper optimizer unless another is named
    optimizer, _ = _adapter_optimizer(SetUp("lora_pro", "adapter", "lora_pro", rank=4))
    assert type(optimizer).__name__ == "LoRAProAdamW"
    prepared = prepare(SetUp("lowrank", "parametrize", "lowrank", rank=4, optimizer="galore",
                             optimizer_options={"rank": 2}), make_llama(hidden=32), 32, None, 3)
    assert type(prepared.optimizer).__name__ == "GaLoreAdamW"


def test_run_setup_checkpoints_and_resumes_to_the_uninterrupted_row(tmp_path):
    setup = SetUp("lora", "adapter", "lora", lr=1e-2, rank=4)
    config = RunConfig(steps=4, batch_size=2, seq_len=16, eval_every=2, eval_batches=2, warmup_steps=1, early_step=2)
    straight, model = run_setup(setup, workload(), config)
    checkpoints = Checkpointing(2, tmp_path, write_output=lambda m, path: (path / "marker").write_text("x"))
    run_setup(setup, workload(), config, checkpointing=checkpoints)
    assert checkpoints.written == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]
    assert (tmp_path / "checkpoint-2" / "marker").is_file()
    resumed, resumed_model = run_setup(setup, workload(), config, resume_from=tmp_path / "checkpoint-2")
    assert resumed["history"] == straight["history"] and resumed["resumed_from_step"] == 2
    assert resumed["initial_val_loss"] == straight["initial_val_loss"]
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RankwiseError, match="was saved by another run \\(rank: saved 4, now 8\\)"):
        run_setup(SetUp("lora", "adapter", "lora", lr=1e-2, rank=8), workload(), config,
                  resume_from=tmp_path / "checkpoint-2")
    with pytest.raises(RankwiseError, match="nothing to resume"):
        run_setup(setup, workload(), config, resume_from=tmp_path / "checkpoint-4")


def test_the_table_has_stable_loss_columns_and_shows_the_loss_before_training():
    rows = []
    for steps in (2, 3):
        config = RunConfig(steps=steps, batch_size=2, seq_len=16, eval_every=1, eval_batches=2, warmup_steps=0,
                           early_step=1)
        row, _ = run_setup(SetUp("lora", "adapter", "lora", lr=1e-2, rank=4), workload(), config)
        rows.append(row)
        header = format_table([row]).splitlines()[0].split("  ")
        assert [h.strip() for h in header if h.strip()][-4:] == ["start loss", "early loss", "val loss", "val ppl"]
    # LoRA leaves the function unchanged at init: the start loss is the base's on the same batches
    from rankwise.training import evaluate

    assert rows[0]["initial_val_loss"] == pytest.approx(evaluate(make_llama(hidden=32), workload().eval_data), abs=1e-6)
    assert rows[0]["early_val_loss"] == rows[0]["history"][0]["val_loss"] and rows[0]["early_step"] == 1
    assert "(start loss: validation loss before the first step; early loss: validation loss at step 1)" in format_table(rows)


def test_the_suite_ratios_divide_by_its_adamw_and_lora_rows():
    from rankwise.bench.report import with_ratios

    rows = [
        {"setup": "full", "method": "adamw", "kind": "full", "ms_per_step": 10.0, "optimizer_state_mb": 8.0,
         "forward_ms": 2.0},
        {"setup": "lora", "method": "lora", "kind": "adapter", "ms_per_step": 5.0, "optimizer_state_mb": 1.0,
         "forward_ms": 4.0},
        {"setup": "other", "method": "dora", "kind": "adapter", "ms_per_step": 7.5, "optimizer_state_mb": 1.0,
         "forward_ms": 6.0},
        {"setup": "skipped", "method": "x", "kind": "reference", "note": "not installed"},
    ]
    full, lora, other, skipped = with_ratios(rows)
    assert (full["time_vs_adamw"], lora["time_vs_adamw"], lora["state_vs_adamw"]) == (1.0, 0.5, 0.125)
    assert (lora["time_vs_lora"], other["time_vs_lora"], other["forward_vs_lora"]) == (1.0, 1.5, 1.5)
    assert full["forward_vs_lora"] == 0.5 and skipped["time_vs_lora"] is None
    assert "step/LoRA" in format_table(rows) and "fwd/LoRA" in format_table(rows)
    assert "step/LoRA" not in format_table(rows[:1])  # no LoRA row: no LoRA columns


def _fake_rows(count):
    return [{"setup": f"set-up {i}", "history": [{"step": s, "val_loss": 5.0 - 0.01 * i - 0.1 * s} for s in (5, 10)],
             "initial_val_loss": 6.0, "final_val_loss": 4.0 - 0.01 * i, "trainable_params": 1000 * (i + 1),
             "optimizer_state_mb": 0.5 * i} for i in range(count)]


def test_the_figure_stays_readable_with_many_setups():
    import matplotlib.pyplot as plt

    styles = [setup_style(i) for i in range(40)]
    assert len({(s["color"], s["linestyle"], s["marker"]) for s in styles}) == 40
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 40  # distinct even without markers
    figure = results_figure({"finetune": _fake_rows(22), "pretrain": _fake_rows(3)})
    (curves, bars), (small_curves, _) = [figure.axes[i:i + 2] for i in (0, 2)]
    lines = curves.get_lines()
    assert len(lines) == 22 and len({(l.get_color(), l.get_linestyle()) for l in lines}) == 22
    assert all(line.get_xdata()[0] == 0 for line in lines)  # every curve starts before training
    figure.canvas.draw()
    legend = curves.get_legend().get_window_extent()
    assert legend.x0 >= curves.get_window_extent().x1  # outside the data area
    filled = [patch for patch in bars.patches if patch.get_fill()]
    hatched = [patch for patch in bars.patches if patch.get_hatch()]
    assert len(filled) == 22 and len(hatched) == 12  # set-ups 10..21 reuse a colour: their bars carry the dash
    labels = [t.get_text() for t in bars.get_yticklabels()]
    assert labels[-1] == "set-up 21" and labels[0] == "set-up 0"  # best (lowest) final loss on top
    notes = [t.get_text() for t in bars.texts]
    assert " 3.7900   22,000 trainable · 10.50 MB state" in notes
    # the start (6.0) is far above training: the curves zoom on training and say so
    assert curves.get_ylim()[1] < 6.0 and "above the axis" in curves.get_title()
    # three set-ups with one evaluation each: the start stays in view, so lines are drawn
    assert all(len(line.get_xdata()) == 3 for line in small_curves.get_lines())
    plt.close(figure)
