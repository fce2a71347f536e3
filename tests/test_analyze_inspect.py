"""``rankwise inspect`` (report.json + a self-contained report.html), ``rankwise pretrain
--log-gradient-rank`` and the bench's results.html; the pages rendered in headless Chromium when it is installed."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import make_gpt2, make_llama
from rankwise.cli.main import main

BASE = ["--base-steps", "3"]


@pytest.fixture
def cli_env(rankwise_cache, one_thread):
    return rankwise_cache


def read_report(out: Path) -> tuple[dict, str]:
    return json.loads((out / "report.json").read_text()), (out / "report.html").read_text()


def assert_self_contained(page: str, min_figures: int) -> None:
    """Nothing is fetched: no external src / href / url(), every image an inline PNG."""
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)
    assert "url(" not in page and "@import" not in page
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= min_figures
    import base64

    assert all(base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n" for image in images)


def render_in_chromium(page_path: Path, screenshot: Path) -> None:
    """Headless Chromium opens the page offline and takes a screenshot (skips if not installed)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the page is checked without it")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={profile}", f"--screenshot={screenshot}", "--window-size=1280,2000",
                        page_path.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (2000, 1280)
    # a rendered page, not a blank or error screen: many distinct colours, mostly light background
    assert len({tuple(p) for p in pixels[::20, ::20, :3].reshape(-1, 3).round(2).tolist()}) > 30
    assert pixels[..., :3].mean() > 0.7


def test_inspect_an_encoder_directory_with_text(minilm_path, tmp_path, one_thread):
    data = tmp_path / "notes.txt"
    data.write_text("Low-rank adapters train a small update. " * 20 + "\n\nSpectra tell how weights are used. " * 10)
    out = tmp_path / "report"
    assert main(["inspect", "--model", minilm_path, "--data", str(data), "--out", str(out)]) == 0
    report, page = read_report(out)
    assert report["meta"]["architecture"] == "BertModel"
    assert len(report["layers"]) == 37 and len(report["power_law"]) == 37
    alphas = sorted(f["alpha"] for f in report["power_law"].values())
    assert 2 <= alphas[len(alphas) // 2] <= 6  # a trained model: heavy tails
    internal = report["entanglement"]["internal"]
    assert internal["of"] == "weight" and len(internal["layers"]) == 12  # query and value of 6 layers
    query = internal["layers"]["encoder.layer.0.attention.self.query"]
    assert query["profile"]["row_factors"] == [2] * 7 + [3] and query["law"]["law"] in ("volume", "area", "log")
    external = report["entanglement"]["external"]
    assert external["tokens"] == 128 and len(external["layers"]) == 6
    assert sum(external["layers"][0]["head_laws"].values()) == 12
    assert report["matrix_nuclear_norm"]["hidden_size"] == 384 and "updates" not in report
    assert_self_contained(page, min_figures=4)
    for text in ("Spectra and heavy tails", "Internal entanglement", "External entanglement", "Representations",
                 "encoder.layer.5.output.dense"):
        assert text in page
    render_in_chromium(out / "report.html", tmp_path / "shot.png")


def test_inspect_a_gpt2_directory_against_its_base(tmp_path, one_thread):
    base = make_gpt2()
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # one large new direction in the first c_attn: intruders there only
        gen = torch.Generator().manual_seed(0)
        tuned.transformer.h[0].attn.c_attn.weight.add_(8 * torch.outer(torch.randn(32, generator=gen),
                                                                        torch.randn(96, generator=gen)))
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    tuned.save_pretrained(tmp_path / "tuned", safe_serialization=True)
    out = tmp_path / "report"
    assert main(["inspect", "--model", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"),
                 "--out", str(out)]) == 0
    report, page = read_report(out)
    assert report["meta"]["architecture"] == "GPT2LMHeadModel"
    names = [row["name"] for row in report["layers"]]
    assert names[0] == "transformer.h.0.attn.c_attn" and report["layers"][0]["shape"] == [96, 32]  # out x in
    updates = {row["name"]: row for row in report["updates"]}
    assert updates["transformer.h.0.attn.c_attn"]["intruder_dimensions"] >= 1
    assert all(row["update_norm"] == 0 for name, row in updates.items() if name != "transformer.h.0.attn.c_attn")
    internal = report["entanglement"]["internal"]
    assert internal["of"] == "update" and list(internal["layers"]) == ["transformer.h.0.attn.c_attn"]
    profile = internal["layers"]["transformer.h.0.attn.c_attn"]["profile"]
    assert profile["row_factors"] == [2, 2, 2, 2, 2, 3] and profile["col_factors"] == [2] * 5
    assert profile["bond_dims"][5] == 1  # the out | in cut of a rank-1 update
    assert any("attention entanglement and the Matrix Nuclear-Norm were skipped" in n for n in report["notes"])
    assert any("transformer.h.1.attn.c_attn did not change" in n for n in report["notes"])
    assert_self_contained(page, min_figures=4)
    assert "intruder dimensions" in page.lower() and "External entanglement" not in page


def test_inspect_applies_an_adapter_to_its_model(tmp_path, one_thread):
    import rankwise

    model = make_llama()
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    rankwise.adapt(model, "lora", rank=2, targets=["q_proj", "v_proj"])
    for layer in rankwise.adapters.adapter_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_()
    rankwise.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "report"
    assert main(["inspect", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out)]) == 0
    report, _ = read_report(out)
    changed = {row["name"] for row in report["updates"] if row["update_norm"] > 0}
    assert changed == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    for row in report["updates"]:
        if row["name"] in changed:
            assert row["update_stable_rank"] <= 2 + 1e-6
    assert report["meta"]["base"].endswith("without the adapter")


def test_inspect_the_embedded_default(cli_env, tmp_path):
    out = tmp_path / "report"
    assert main(["inspect", *BASE, "--out", str(out)]) == 0
    report, page = read_report(out)
    assert len(report["layers"]) == 4 * 7 and report["meta"]["architecture"] == "LlamaForCausalLM"
    assert len(report["entanglement"]["internal"]["layers"]) == 8
    assert report["entanglement"]["external"]["tokens"] == 128
    assert report["matrix_nuclear_norm"]["num_tokens"] > 128
    assert_self_contained(page, min_figures=4)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent"], "model directory /nonexistent does not exist"),
    (["--attention-tokens", "2"], "--attention-tokens must be >= 4"),
])
def test_inspect_refuses_bad_input(argv, message, tmp_path, capsys):
    assert main(["inspect", *argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_inspect_refuses_a_directory_without_an_adapter_config(tmp_path, capsys):
    make_llama().save_pretrained(tmp_path / "model", safe_serialization=True)
    (tmp_path / "empty").mkdir()
    assert main(["inspect", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_pretrain_logs_gradient_ranks(cli_env, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--log-gradient-rank", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "gradient_rank.json").read_text())
    assert record["every"] == 2 and sorted({r["step"] for r in record["records"]}) == [1, 2]
    assert len(record["summary"]) == 4 * 7  # every Linear of the tiny LLaMA but the head
    assert "stable rank first->last" in printed and str(out / "gradient_rank.json") in printed
    for row in record["records"]:
        assert 1 - 1e-6 <= row["stable_rank"] <= min(row["shape"])


def test_pretrain_refuses_gradient_ranks_with_a_layerwise_optimizer(cli_env, capsys):
    assert main(["pretrain", "--steps", "2", "--layerwise", "--log-gradient-rank"]) == 2
    assert "--log-gradient-rank needs the gradients" in capsys.readouterr().err


def test_bench_writes_a_self_contained_results_page(cli_env, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "pretrain", "--setups", "adamw,galore", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 0
    page = (out / "results.html").read_text()
    results = json.loads((out / "results.json").read_text())
    assert_self_contained(page, min_figures=1)
    assert "suite pretrain" in page and "val loss" in page
    for row in results["suites"]["pretrain"]:
        assert row["setup"] in page and f"{row['final_val_loss']:.4f}" in page
    render_in_chromium(out / "results.html", tmp_path / "shot.png")


def test_html_page_escapes_text():
    from rankwise.report_html import HtmlPage

    page = HtmlPage("<title>", subtitle="a & b")
    page.heading("x < y")
    page.table(["<b>"], [["<script>alert(1)</script>"]])
    text = page.render()
    assert "<script>alert" not in text and "&lt;script&gt;" in text and "&lt;title&gt;" in text
    with pytest.raises(FileNotFoundError):
        page.figure("/nonexistent.png")
