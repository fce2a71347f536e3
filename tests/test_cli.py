"""End-to-end runs of the ``rankwise`` command on the embedded data (tiny step counts)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import make_llama, register_for_test
from rankwise.cli.main import main
from rankwise.compress import COMPRESSORS
from rankwise.compress.svd import SVDCompressor
from rankwise.errors import RankwiseError
from rankwise.options import Option
from rankwise.pretrain import PARAMETRISATIONS
from rankwise.pretrain.lowrank import LowRank

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


# ----- rankwise methods, --help-method, --method-args ------------------------------------------


def test_methods_lists_every_registered_method_of_every_pillar_with_its_paper(capsys):
    from rankwise.cli.methods import PILLARS

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "pillar", "family", "paper"]
    listed = {(line.split()[0], line.split()[1]) for line in lines[1:]}
    expected = {(name, pillar) for pillar, p in PILLARS.items() for name in p.registry.names()}
    assert listed == expected and len(lines) == 1 + len(expected)
    assert set(PILLARS) == {"adapters", "optim", "pretrain", "compress", "analyze"}
    svd_line = next(line for line in lines if line.startswith("svd "))
    assert svd_line.split()[1:3] == ["compress", "svd"]
    assert svd_line.endswith("LORD: Low Rank Decomposition Of Monolingual Code LLMs For One-Shot Compression (arXiv 2309.14021)")


def test_methods_filters_by_pillar_and_pattern(capsys):
    assert main(["methods", "lora*", "--pillar", "optim"]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]] == [["lora_pro", "optim"]]
    assert main(["methods", "*_rank"]) == 0
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]] == [
        ["effective_rank", "analyze"], ["stable_rank", "analyze"]]
    assert main(["methods", "--pillar", "layers"]) == 2
    assert "unknown pillar 'layers'; known: adapters, optim, pretrain, compress, analyze" in capsys.readouterr().err
    assert main(["methods", "zzz*"]) == 2
    assert "no method matches 'zzz*'" in capsys.readouterr().err


def help_method(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_help_method_prints_the_declared_options_and_exits_without_running(capsys):
    # compress requires --ratio: --help-method answers before the arguments are checked
    code, out, _ = help_method(["compress", "--help-method", "svd"], capsys)
    assert code == 0
    assert out.splitlines() == [
        "compression method svd (pillar compress, family svd)",
        "  LORD: Low Rank Decomposition Of Monolingual Code LLMs For One-Shot Compression (arXiv 2309.14021)",
        "  options (--method-args k=v,...):",
        "    niter=None  (None or an integer >= 0)  power iterations of a randomized SVD (e.g. 4); None = exact thin SVD",
        "    seed=0  (an integer)  seed of the randomized SVD's sketch (used when niter is set)",
    ]
    code, out, _ = help_method(["pretrain", "--help-method", "lowrank"], capsys)
    assert code == 0 and "    seed=None  (None or an integer)  seed of the factors' draw" in out


def test_help_method_shows_every_pillar_of_the_command_that_has_the_name(capsys):
    code, out, _ = help_method(["finetune", "--help-method", "lora_pro"], capsys)
    assert code == 0
    assert out.startswith("adapter method lora_pro (pillar adapters, family training_time)")
    assert "\noptimizer lora_pro (pillar optim, family adapter_optimizer)" in out
    assert "    dropout=0.0  (" in out and "    rslora=False  (True or False)" in out
    code, out, _ = help_method(["pretrain", "--help-method", "galore"], capsys)
    assert code == 0 and "    update_proj_gap=200  (an integer >= 1)  steps T between subspace refreshes" in out
    assert "    rank=128  (an integer >= 1)" in out
    code, _, err = help_method(["compress", "--help-method", "tucker"], capsys)
    assert code == 2 and "no method 'tucker' in compress; known: svd" in err


class RecordingCompressor(SVDCompressor):
    """A test-only compressor with one option: records the values the command passed."""

    OPTIONS = {"knob": Option(1, int, low=0, help="a test knob")}
    seen: list = []

    def factorize(self, name, linear, rank, stats):
        type(self).seen.append(dict(self.options))
        return super().factorize(name, linear, rank, stats)


def test_method_args_reach_the_compressor_typed_and_checked(cli_env, monkeypatch, capsys):
    register_for_test(monkeypatch, COMPRESSORS, "recording", RecordingCompressor)
    RecordingCompressor.seen = []
    argv = ["compress", "--method", "recording", "--ratio", "0.5", "--targets", "q_proj", *BASE]
    assert main([*argv, "--method-args", "knob=3,niter=2"]) == 0
    assert RecordingCompressor.seen and all(s == {"knob": 3, "niter": 2, "seed": 0} for s in RecordingCompressor.seen)
    assert main([*argv, "--method-args", "knob=-1"]) == 2
    assert "compression method 'recording': option knob must be an integer >= 0, got -1" in capsys.readouterr().err
    assert main([*argv, "--method-args", "knobs=1"]) == 2
    assert "unknown option(s) knobs; it accepts: knob=1, niter=None, seed=0" in capsys.readouterr().err


class RecordingLowRank(LowRank):
    OPTIONS = {"knob": Option(0.5, float, low=0, high=1, help="a test knob")}
    seen: list = []

    def __init__(self, rank, **options):
        super().__init__(rank, **options)
        type(self).seen.append(dict(self.options))


def test_method_args_reach_the_parametrisation(cli_env, monkeypatch, capsys):
    register_for_test(monkeypatch, PARAMETRISATIONS, "recording", RecordingLowRank)
    RecordingLowRank.seen = []
    assert main(["pretrain", "--parametrize", "recording", "--rank", "4", "--steps", "2",
                 "--method-args", "knob=0.25,seed=5"]) == 0
    assert RecordingLowRank.seen == [{"knob": 0.25, "seed": 5, "refactor_every": None, "momentum_reset_every": None}]
    assert main(["pretrain", "--parametrize", "recording", "--rank", "4", "--steps", "2",
                 "--method-args", "knob=2"]) == 2
    assert "option knob must be a number in [0, 1], got 2" in capsys.readouterr().err


def test_method_args_reach_the_adapter(cli_env, tmp_path):
    out = tmp_path / "adapter"
    assert main(["finetune", "--method", "lora", "--rank", "4", "--targets", "q_proj", "--steps", "2", *BASE,
                 "--method-args", "rslora=True,dropout=0.25", "--out", str(out)]) == 0
    modules = json.loads((out / "adapter_config.json").read_text())["modules"]
    assert modules and all(m["options"]["rslora"] is True and m["options"]["dropout"] == 0.25 for m in modules.values())


def test_method_args_are_the_optimizers_when_it_is_the_method():
    from rankwise.bench.kinds import prepare
    from rankwise.cli.common import optim_setup as _optim_setup
    from rankwise.cli.main import build_parser

    args = build_parser().parse_args(["pretrain", "--optim", "galore", "--rank", "4",
                                      "--method-args", "update_proj_gap=7,proj_type=left", "--optim-args", "scale=0.5"])
    setup = _optim_setup(args, "cli", default_lr=1e-3, method_args=True)
    group = prepare(setup, make_llama(), 32, None, 3).optimizer.param_groups[0]
    assert (group["update_proj_gap"], group["proj_type"], group["scale"], group["rank"]) == (7, "left", 0.5, 4)
    twice = build_parser().parse_args(["pretrain", "--optim", "galore", "--method-args", "scale=0.5",
                                       "--optim-args", "scale=0.25"])
    with pytest.raises(RankwiseError, match="scale given twice"):
        _optim_setup(twice, "cli", default_lr=1e-3, method_args=True)
    typed = build_parser().parse_args(["pretrain", "--optim", "galore", "--method-args", "update_proj_gap=often"])
    with pytest.raises(RankwiseError, match="optimizer 'galore': option update_proj_gap must be an integer"):
        _optim_setup(typed, "cli", default_lr=1e-3, method_args=True)
