"""The optimizers inside the transformers Trainer, accelerate and the rankwise CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_llama

from rankwise import optim
from rankwise.cli.main import build_parser
from rankwise.errors import RankwiseError


class TokenRows(torch.utils.data.Dataset):
    """A tiny causal-LM dataset: ``count`` rows of 16 random tokens."""

    def __init__(self, count: int = 16) -> None:
        self.rows = make_batch(seed=5, batch=count)

    def __len__(self) -> int:
        return len(self.rows["input_ids"])

    def __getitem__(self, index: int) -> dict:
        return {k: v[index] for k, v in self.rows.items()}


def trainer_run(tmp_path, layerwise: bool, accumulation: int):
    from transformers import Trainer, TrainingArguments

    model = make_llama()
    options = {"layerwise": True, "accumulation_steps": accumulation} if layerwise else {}
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4, update_proj_gap=2, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run-{layerwise}"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.0,  # clipping by the global norm cannot be honoured in layerwise mode
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenRows(), optimizers=(optimizer, scheduler))
    output = trainer.train()
    return model, optimizer, output


def test_trainer_runs_galore_as_optimizers_pair_and_layerwise_with_accumulation_matches(tmp_path):
    start = make_llama().state_dict()
    plain, plain_opt, plain_out = trainer_run(tmp_path, layerwise=False, accumulation=2)
    layerwise, layerwise_opt, layerwise_out = trainer_run(tmp_path, layerwise=True, accumulation=2)
    assert plain_out.global_step == layerwise_out.global_step == 3
    # the scheduler stepped 3 times through the Trainer: lr = 1e-2 / (1 + 3)
    assert plain_opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    assert layerwise_opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(plain.state_dict()[q], start[q])
    assert plain_opt.state[plain.get_parameter(q)]["step"] == 3
    for (name, a), b in zip(plain.named_parameters(), layerwise.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("layerwise", [False, True])
def test_accelerate_prepared_optimizer_matches_a_plain_loop(layerwise):
    from accelerate import Accelerator

    def run(prepared: bool):
        model = make_llama()
        optimizer = optim.build(model, "galore", lr=1e-2, rank=4, update_proj_gap=2, layerwise=layerwise)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
        accelerator = Accelerator(cpu=True)
        if prepared:
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        for step in range(3):
            loss = model(**make_batch(seed=step)).loss
            accelerator.backward(loss) if prepared else loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        return accelerator.unwrap_model(model) if prepared else model

    plain, prepared = run(False), run(True)
    for (name, a), b in zip(plain.named_parameters(), prepared.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def prepared_optimizer(argv: list[str]):
    """What ``rankwise pretrain <argv>`` would train the tiny model with."""
    from rankwise.bench.runner import prepare
    from rankwise.cli.common import optim_setup as _optim_setup

    args = build_parser().parse_args(["pretrain", *argv])
    setup = _optim_setup(args, "cli", default_lr=1e-3)
    model = make_llama()
    return model, prepare(setup, model, hidden_size=32, data_batches=None, steps=3).optimizer


def test_cli_optimizer_flags_reach_the_optimizer():
    model, optimizer = prepared_optimizer(
        ["--optim", "galore", "--rank", "4", "--update-proj-gap", "7", "--scale", "0.5", "--proj-type", "left",
         "--optim-target-modules", "q_proj,v_proj", "--lr", "0.02", "--optim-args", "moment_policy=reset"]
    )
    projected = optimizer.param_groups[0]
    assert {k: projected[k] for k in ("rank", "update_proj_gap", "scale", "proj_type", "moment_policy", "lr")} == {
        "rank": 4, "update_proj_gap": 7, "scale": 0.5, "proj_type": "left", "moment_policy": "reset", "lr": 0.02}
    attention = [layer.self_attn for layer in model.model.layers]
    targeted = {id(getattr(a, m).weight) for a in attention for m in ("q_proj", "v_proj")}
    assert {id(p) for p in projected["params"]} == targeted


def test_cli_layerwise_flags_build_a_layerwise_optimizer():
    _, optimizer = prepared_optimizer(["--optim", "galore", "--rank", "4", "--layerwise", "--accumulation-steps", "3"])
    assert isinstance(optimizer, optim.LayerwiseOptimizer) and optimizer.accumulation_steps == 3


def test_cli_accumulation_without_layerwise_is_refused():
    with pytest.raises(RankwiseError, match="layerwise"):
        prepared_optimizer(["--optim", "galore", "--rank", "4", "--accumulation-steps", "3"])


# ---- the optim bench suite and the reference builders


def tiny_workload():
    from rankwise.bench.runner import RunConfig, Workload
    from rankwise.data.batches import eval_batches

    tokens = torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(3))
    config = RunConfig(steps=3, batch_size=2, seq_len=16, eval_every=3, eval_batches=2, warmup_steps=0, early_step=1)
    evaluation = eval_batches(tokens[:512], batch_size=2, seq_len=16, max_batches=2)
    return Workload("tiny", make_llama, tokens, evaluation, 32), config


def test_reference_galore_state_is_measured_inside_its_projector_objects():
    """galore-torch keeps its basis in a projector object, as a slice (a view) of the full SVD
    factor, so the whole ``min(m, n)^2`` factor stays alive; rankwise stores the ``r`` columns.
    The walk must see exactly that difference (and the flat count misses the basis)."""
    pytest.importorskip("galore_torch")
    from rankwise.bench.references import build_reference, reference_state_bytes

    batch = make_batch()
    counts = []
    for make in (lambda m: build_reference(m, "galore-torch", lr=1e-2, rank=4, update_proj_gap=2),
                 lambda m: optim.build(m, "galore", lr=1e-2, rank=4, update_proj_gap=2)):
        model = make_llama()
        optimizer = make(model)
        model(**batch).loss.backward()
        optimizer.step()
        counts.append((reference_state_bytes(optimizer), optim.state_bytes(optimizer)))
    (reference_walked, reference_flat), (rankwise_walked, rankwise_flat) = counts
    assert rankwise_walked == rankwise_flat
    projected, _ = optim.split_parameters(make_llama())
    kept_alive = sum((min(p.shape) ** 2 - 4 * min(p.shape)) * 4 for _, p in projected)
    assert reference_walked - rankwise_flat == kept_alive
    assert reference_flat < reference_walked


def test_bench_rows_carry_ratios_to_adamw_and_skip_missing_references(monkeypatch):
    pytest.importorskip("galore_torch")
    from rankwise.bench import references
    from rankwise.bench.report import format_table, with_ratios
    from rankwise.bench.runner import run_setup
    from rankwise.bench.suites import SUITES, SetUp

    monkeypatch.setitem(references.REFERENCES, "missing-ref",
                        references.Reference("missing-ref", "no_such_module_rankwise", "X", "galore", "scale",
                                             references.REFERENCES["galore-torch"].group_keys))
    workload, config = tiny_workload()
    setups = [s for s in SUITES["optim"] if s.name in ("adamw", "galore", "galore-torch GaLoreAdamW")]
    setups.append(SetUp("missing", "reference", "missing-ref", rank=4))
    rows = [run_setup(setup, workload, config)[0] for setup in setups]
    adamw, galore, reference, missing = with_ratios(rows)
    assert adamw["state_vs_adamw"] == 1.0 and adamw["time_vs_adamw"] == 1.0
    assert galore["state_vs_adamw"] == pytest.approx(galore["optimizer_state_mb"] / adamw["optimizer_state_mb"])
    assert 0 < galore["state_vs_adamw"] < 1 and galore["refresh_ms_per_step"] > 0
    assert reference["optimizer_state_mb"] > galore["optimizer_state_mb"]  # it keeps whole SVD factors alive
    assert reference["final_val_loss"] == pytest.approx(galore["final_val_loss"], abs=1e-4)  # same trajectory
    assert "not installed" in missing["note"] and missing.get("final_val_loss") is None
    table = format_table(rows)
    assert "state/AdamW" in table and "time/AdamW" in table and "note: missing: skipped" in table


def optim_suite_setups():
    from rankwise.bench.suites import select_setups

    return select_setups("optim", None, include_all=True)


@pytest.mark.parametrize("setup", optim_suite_setups(), ids=lambda setup: setup.name)
def test_every_optim_suite_row_is_buildable(setup):
    """Reference rows need their package (a test oracle): skipped without it, failed under CI=true."""
    from rankwise.bench.runner import prepare

    if setup.kind == "reference":
        from rankwise.bench.references import reference

        pytest.importorskip(reference(setup.method).module)
    optimizer = prepare(setup, make_llama(), hidden_size=32, data_batches=None, steps=3).optimizer
    assert isinstance(optimizer, torch.optim.Optimizer) and optimizer.param_groups, setup.name
