"""End-to-end runs of the ``rankwise`` command on the embedded data (tiny step counts)."""

from __future__ import annotations

import json
import math

import pytest

from rankwise.cli.main import main

BASE = ["--base-steps", "3"]


@pytest.fixture
def cli_env(rankwise_cache, one_thread):
    return rankwise_cache


def test_bench_writes_table_json_csv_and_png(cli_env, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--steps", "3", *BASE, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["suites"]) == {"pretrain", "finetune"}
    by_name = {row["setup"]: row for rows in results["suites"].values() for row in rows}
    assert {"adamw", "galore", "low-rank W=BA", "full fine-tuning", "lora"} <= set(by_name)
    for name, row in by_name.items():
        assert name in printed
        assert math.isfinite(row["final_val_loss"]) and row["final_val_ppl"] == pytest.approx(math.exp(row["final_val_loss"]))
        assert row["ms_per_step"] > 0 and row["peak_memory_mb"] > 0
    assert by_name["galore"]["optimizer_state_mb"] < by_name["adamw"]["optimizer_state_mb"]
    assert by_name["lora"]["trainable_params"] < by_name["full fine-tuning"]["trainable_params"] / 10
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + len(by_name)
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_finetune_with_lora_saves_a_loadable_adapter(cli_env, tmp_path):
    import torch

    import rankwise
    from rankwise.data.models import load_base

    out = tmp_path / "adapter"
    assert main(["finetune", "--method", "lora", "--rank", "4", "--targets", "q_proj,v_proj", "--steps", "3", *BASE,
                 "--out", str(out)]) == 0
    model = rankwise.load_adapter(load_base("tiny", steps=3, progress=False), out)
    assert len(rankwise.adapters.adapter_layers(model)) == 2 * model.config.num_hidden_layers
    ids = torch.arange(16)[None]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_pretrain_with_galore_flags(cli_env, capsys):
    assert main(["pretrain", "--optim", "galore", "--rank", "8", "--update-proj-gap", "2", "--scale", "0.25",
                 "--optim-target-modules", "q_proj,v_proj", "--steps", "3"]) == 0
    assert "pretrain galore" in capsys.readouterr().out


def test_compress_reports_and_saves(cli_env, tmp_path, capsys):
    import rankwise

    out = tmp_path / "compressed"
    assert main(["compress", "--ratio", "0.5", *BASE, "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    model = rankwise.load_compressed(out)
    assert any(type(m).__name__ == "FactorizedLinear" for m in model.modules())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "--ratio", "1.5"], "ratio"),
        (["bench", "--suite", "nope"], "unknown suite"),
        (["pretrain", "--optim", "nope", "--steps", "2"], "unknown optimizer"),
        (["finetune", "--model", "/nonexistent"], "--model and --data go together"),
    ],
)
def test_bad_input_exits_2_with_a_message(cli_env, argv, message, capsys):
    assert main([*argv, *BASE] if argv[0] != "bench" else argv) == 2
    assert message in capsys.readouterr().err
