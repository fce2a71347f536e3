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
