"""``rankwise compress`` and ``rankwise finetune --welore-lrc-only`` end to end (tiny step counts)."""

from __future__ import annotations

import json

import pytest

import rankwise
from rankwise.cli.main import main

BASE = ["--base-steps", "3"]


@pytest.fixture
def cli_env(rankwise_cache, one_thread):
    return rankwise_cache


def test_compress_reports_size_quality_and_latency_and_saves_a_loadable_model(cli_env, tmp_path, capsys):
    out = tmp_path / "compressed"
    assert main(["compress", "--method", "svd_llm", "--ratio", "0.5", "--latency-repeats", "1", "--eval-batches", "2",
                 *BASE, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for expected in ("ratio = the fraction of the targeted layers' weights that remains", "realised ratio 0.",
                     "whole model:", "perplexity on the embedded pretrain split's validation part",
                     "CPU forward latency", "batch 1 x 128", "batch 16 x 128", "28 factorized"):
        assert expected in printed
    model = rankwise.load_compressed(out)
    assert model.rankwise_compression["method"] == "svd_llm"
    assert (out / "tokenizer.json").is_file()  # the directory is self-contained for the next command


def test_compress_an_encoder_data_free_without_data_and_data_driven_with_it(cli_env, minilm_path, tmp_path, capsys):
    argv = ["compress", "--model", minilm_path, "--ratio", "0.5", "--latency-repeats", "1", "--eval-batches", "1",
            "--seq-len", "64", "--targets", r"re:encoder\.layer\.0\..*"]
    assert main([*argv, "--method", "svd"]) == 0
    printed = capsys.readouterr().out
    assert "BertModel" in printed and "hidden-state cosine fidelity to the original on the embedded finetune split" \
        in printed and "6 factorized" in printed
    assert main([*argv, "--method", "svd_llm"]) == 2
    assert "svd_llm (allocation uniform) is data-driven: pass --data FILE" in capsys.readouterr().err
    data = tmp_path / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Paragraph {i}: low-rank factors of a weight matrix keep the "
                                                  f"directions its inputs use most, number {i} of many."})
                              for i in range(40)))
    assert main([*argv, "--method", "fwsvd", "--data", str(data), "--calibration-batches", "1"]) == 0
    assert "of --data" in capsys.readouterr().out


def test_bad_compress_arguments_exit_2_with_a_message(cli_env, capsys, tmp_path):
    assert main(["compress", "--ratio", "1.5", *BASE]) == 2
    assert "ratio must be a number in (0, 1)" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["compress", "--ratio", "0.5", "--out", str(tmp_path / "file"), *BASE]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["compress", "--ratio", "0.5", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_finetune_welore_lrc_only_trains_the_compressed_base_and_saves_it(cli_env, tmp_path, capsys):
    out = tmp_path / "welore"
    assert main(["finetune", "--welore-lrc-only", "--steps", "2", *BASE, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "welore 0.5 LRC only" in printed
    model = rankwise.load_compressed(out)
    assert model.rankwise_compression["method"] == "welore" and model.rankwise_compression["realised_ratio"] <= 0.5
    assert main(["finetune", "--welore-lrc-only", "0.7", "--method", "lora", "--steps", "2", *BASE]) == 2
    assert "drop --method" in capsys.readouterr().err
