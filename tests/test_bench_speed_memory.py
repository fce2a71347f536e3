"""The speed and memory bench suites at a tiny size: structure and correctness, never timings.

The speed suite's ratios are checked for being what they say (amortised = steady + refresh
share, ratios against the rows they name, captured energies in (0, 1]); the memory suite's
bytes against the optimizers' own ``state_bytes`` on real tensors and closed-form counts.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rankwise import optim
from rankwise.bench.suites import SUITE_RUNS, SUITES, memory, speed

TINY_CONFIG = {"hidden": 32, "intermediate": 64, "heads": 4, "layers": 2, "rank": 4}


def test_both_suites_are_registered_with_their_run_hooks():
    assert SUITES["speed"] == [] and SUITES["memory"] == []
    assert SUITE_RUNS["speed"] is speed.run and SUITE_RUNS["memory"] is memory.run


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def speed_result():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return speed.measure(
            {48: 96}, steps=dict(rank=4, gap=10, repeats=2, layers=1, vocab=64),
            refresh=dict(rank=4, niters=(1,), repeats=1, layers=1, vocab=64),
            model=tiny_bert(), init=dict(rank=4, niters=(2,), repeats=1),
            lora=dict(ranks=(4,), batch=2, seq=8, repeats=1),
        )


def test_speed_optimizer_rows_are_consistent(speed_result):
    rows = speed_result["optimizer_steps"]
    labels = {r["optimizer"] for r in rows}
    assert "torch AdamW" in labels
    for name in speed.SVD_BASED:
        assert {f"rankwise {name} ({mode})" for mode in speed.MODES} <= labels
    adamw = next(r for r in rows if r["optimizer"] == "torch AdamW")
    for row in rows:
        refresh_share = max(row["refresh_step_s"] - row["steady_s"], 0.0) / row["gap"]
        assert row["amortised_s"] == pytest.approx(row["steady_s"] + refresh_share)
        assert row["amortised_vs_adamw"] == pytest.approx(row["amortised_s"] / adamw["steady_s"])
        if row.get("captured_energy") is not None:
            assert 0.0 < row["captured_energy"] <= 1.0 + 1e-5
        if row["optimizer"] in {"rankwise galore (svd)", "rankwise fira (svd)", "rankwise frugal (svd)"}:
            assert row["captured_energy"] == pytest.approx(1.0, abs=1e-4)  # the exact top-r
    galore = next(r for r in rows if r["optimizer"] == "rankwise galore (svd)")
    reference = next((r for r in rows if r["optimizer"] == "galore-torch"), None)
    if reference is not None:
        assert galore["amortised_vs_reference"] == pytest.approx(galore["amortised_s"] / reference["amortised_s"])


def test_speed_refresh_modes_measure_energy_against_the_exact_svd(speed_result):
    rows = {r["mode"]: r for r in speed_result["refresh_modes"]}
    assert set(rows) == {"svd", "randomized niter=1", "warm niter=1"}
    assert rows["svd"]["captured_energy"] == pytest.approx(1.0, abs=1e-5)
    assert rows["svd"]["speedup_vs_svd"] == pytest.approx(1.0)
    for row in rows.values():
        assert 0.0 < row["captured_energy"] <= 1.0 + 1e-5


def test_speed_init_rows_compare_residual_errors(speed_result):
    rows = {r["init"]: r for r in speed_result["adapter_init"]}
    assert {f"rankwise {method} (exact)" for method in speed.INIT_METHODS} <= set(rows)
    exact, fast = rows["rankwise pissa (exact)"], rows["rankwise pissa niter=2"]
    assert exact["residual_error"] <= fast["residual_error"] + 1e-6  # the exact split leaves the least
    assert rows["rankwise eva (exact)"]["residual_error"] is None  # EVA's base stays W
    if "peft pissa" in rows:  # the same exact decomposition leaves the same residual in both libraries
        assert rows["peft pissa"]["residual_error"] == pytest.approx(exact["residual_error"], rel=1e-4)
        assert fast["vs_peft_pissa_niter_4"] == pytest.approx(
            fast["seconds"] / rows["peft pissa_niter_4"]["seconds"])
        assert rows["peft olora"]["residual_error"] == pytest.approx(
            rows["rankwise olora (exact)"]["residual_error"], rel=1e-4)
        # PEFT's CorDA scales each sequence by its largest entry: a slightly different context
        assert rows["peft corda"]["residual_error"] == pytest.approx(
            rows["rankwise corda (exact)"]["residual_error"], rel=1e-2)
        for row in rows.values():
            reference = rows[f"peft {speed.INIT_METHODS[row['method']]['peft'][0]}"]
            assert row["vs_peft"] == pytest.approx(row["seconds"] / reference["seconds"])


def test_speed_lora_rows_cover_both_dtypes(speed_result):
    rows = speed_result["lora_steps"]
    pytest.importorskip("peft")
    assert {(r["dtype"], r["rank"]) for r in rows} == {("float32", 4), ("bfloat16", 4)}
    for row in rows:
        assert row["vs_peft"] == pytest.approx(row["rankwise_s"] / row["peft_s"])


@pytest.fixture(scope="module")
def memory_rows():
    return memory.measure({"tiny": TINY_CONFIG}, vocab=64)


def test_memory_rows_cover_every_optimizer_and_the_finetuning_setups(memory_rows):
    setups = {r["setup"] for r in memory_rows}
    assert setups == {"torch_adamw", *(n for n in optim.names() if n != "lora_pro"), "lora", "qlora"}


def test_memory_meta_accounting_equals_state_bytes_on_real_tensors(memory_rows):
    """The meta-device step allocates exactly the state a real step allocates."""
    for name in ("galore", "apollo", "qgalore", "adamw"):
        model = memory.llama_on_meta(TINY_CONFIG, vocab=64).to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = optim.build(model, name, lr=1e-3, **memory.optimizer_options(name, TINY_CONFIG["rank"]))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        row = next(r for r in memory_rows if r["setup"] == name)
        assert row["state_bytes"] == optim.state_bytes(opt)


def test_memory_adamw_is_weights_plus_two_bf16_moments(memory_rows):
    row = next(r for r in memory_rows if r["setup"] == "adamw")
    assert row["weight_bytes"] == 2 * row["parameters"]
    tensors = len(list(memory.llama_on_meta(TINY_CONFIG, vocab=64).parameters()))
    assert row["state_bytes"] == 2 * 2 * row["parameters"] + 4 * tensors  # torch's float32 step per tensor
    lora = next(r for r in memory_rows if r["setup"] == "lora")
    qlora = next(r for r in memory_rows if r["setup"] == "qlora")
    assert qlora["state_bytes"] == lora["state_bytes"] and qlora["weight_bytes"] < lora["weight_bytes"]


def test_memory_run_writes_the_table_and_the_plot(tmp_path, monkeypatch):
    from rankwise.bench.suites import SuiteRun

    monkeypatch.setattr(memory, "CONFIGS", {"tiny": TINY_CONFIG})
    monkeypatch.setattr(memory, "VOCAB", 64)
    original = memory.measure
    monkeypatch.setattr(memory, "measure", lambda: original({"tiny": TINY_CONFIG}, vocab=64))
    written = memory.run(SuiteRun(config=None, model_preset="tiny", out=tmp_path))
    assert [p.name for p in written] == ["memory.json", "memory.png"]
    assert all(p.stat().st_size > 0 for p in written)
