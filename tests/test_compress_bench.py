"""The compress bench suite's sweep (``rankwise bench --suite compress``) and WeLore's ``compress_lrc`` set-up kind."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_llama
from rankwise.bench.kinds import prepare
from rankwise.bench.setup import SetUp
from rankwise.bench.suites import compress as suite
from rankwise.compress import trainable_lrc
from rankwise.data.batches import TokenBatches


def test_the_compress_lrc_kind_trains_only_the_low_rank_components():
    model = make_llama(hidden=32)
    batches = TokenBatches(torch.randint(0, 128, (4096,)), batch_size=2, seq_len=16)
    prepared = prepare(SetUp("w", "compress_lrc", "welore", ratio=0.5, lr=1e-3), model, 32, batches, 3)
    assert model.rankwise_compression["method"] == "welore"
    trained = {id(p) for group in prepared.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in trainable_lrc(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(trained) < len(list(model.parameters()))


@pytest.mark.slow
def test_bench_suite_compress_sweeps_methods_times_them_and_draws_the_figure(rankwise_cache, one_thread, minilm_path,
                                                                             tmp_path, monkeypatch, capsys):
    from rankwise.cli.main import main

    monkeypatch.setattr(suite, "RATIOS", (0.5,))
    monkeypatch.setattr(suite, "LATENCY_REPEATS", 1)
    monkeypatch.setattr(suite, "variants", lambda: [suite.Variant(m, m) for m in ("svd", "svd_llm", "modegpt")])
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "compress", "--steps", "2", "--base-steps", "3", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "compress_quality.json").read_text())
    models = {row["model"] for row in results["quality"]}
    assert models == {"base LLaMA (tiny)", "all-MiniLM-L6-v2"}
    by = {(r["model"], r["method"]): r for r in results["quality"]}
    for method in ("svd", "svd_llm", "modegpt"):
        row = by[("base LLaMA (tiny)", method)]
        assert row["realised_ratio"] <= 0.5 and row["quality"] > by[("base LLaMA (tiny)", "dense")]["quality"]
    assert 0 < by[("all-MiniLM-L6-v2", "svd_llm")]["quality"] < 1
    assert by[("all-MiniLM-L6-v2", "modegpt")]["note"].startswith("refused: modegpt compresses LLaMA decoder blocks")
    latency = {(r["model"], r["method"], r["batch"]) for r in results["latency"]}
    assert ("base LLaMA (tiny)", "modegpt", 16) in latency and ("all-MiniLM-L6-v2", "welore", 1) in latency
    assert results["orderings"][0].startswith("base LLaMA (tiny) at ratio 0.5: svd_llm < svd")
    assert (out / "compress_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "published perplexity ordering" in printed and "svd 50%" in printed  # the recovery rows trained too
