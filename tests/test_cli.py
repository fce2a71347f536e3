"""End-to-end runs of the ``rankwise`` command on the embedded data and on small model
directories (tiny step counts): every flag takes effect or is refused, every output directory
is a valid ``--model`` for the next command."""

from __future__ import annotations

import json
import math

import pytest

from conftest import make_llama, register_for_test
from rankwise.adapters.base import LINEAR_LIKE
from rankwise.cli.main import main
from rankwise.compress import COMPRESSORS
from rankwise.compress.svd import SVDCompressor
from rankwise.errors import RankwiseError
from rankwise.options import Option
from rankwise.pretrain import PARAMETRISATIONS
from rankwise.pretrain.lowrank import LowRank

BASE = ["--base-steps", "3"]


@pytest.fixture
def cli_env(rankwise_cache, one_thread, tmp_path, monkeypatch):
    """The session's cache, one thread, and a scratch working directory (default outputs land there)."""
    monkeypatch.chdir(tmp_path)
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
        (["finetune", "--model", "/nonexistent"], "--model needs --data"),
    ],
)
def test_bad_input_exits_2_with_a_message(cli_env, argv, message, capsys):
    assert main([*argv, *BASE] if argv[0] == "compress" else argv) == 2
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
        ["effective_rank", "analyze"], ["energy_rank", "analyze"], ["stable_rank", "analyze"]]
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
    assert code == 2 and "no method 'tucker' in compress; known: asvd, fwsvd, modegpt, svd, svd_llm, welore" in err


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
    modules = json.loads((out / "rankwise_adapter.json").read_text())["modules"]
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


# ===== issue 10: every flag takes effect or is refused; outputs feed back in ========================

import re  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import rankwise  # noqa: E402
from model_dirs import bert_dir, gpt2_dir, llama_dir, text_file  # noqa: E402
from rankwise.adapters import ADAPTERS, AdapterLayer  # noqa: E402

#: a short, small run: 2 steps of 2 x 32 tokens, no bars (a test's own flags come after, and win)
FAST = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress"]


def run(command: str, *argv: str) -> int:
    return main([command, *FAST, *argv])


def finetune(*argv: str) -> int:
    base = [] if "--model" in argv else BASE
    return run("finetune", *base, *argv)


def base_model():
    from rankwise.data.models import load_base

    return load_base("tiny", steps=3, progress=False)


def logits(model, ids=None):
    ids = torch.arange(1, 17)[None] if ids is None else ids
    model.eval()
    with torch.no_grad():
        output = model(input_ids=ids)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def adapter_tensors(directory):
    from safetensors.torch import load_file

    return load_file(Path(directory) / "rankwise_adapter.safetensors")


class RecordingBuild:
    """Wraps rankwise.optim.build to record the name and keywords each call gets."""

    def __init__(self, monkeypatch):
        from rankwise import optim

        self.calls, self.original = [], optim.build
        monkeypatch.setattr(optim, "build", self)

    def __call__(self, model, name, **kwargs):
        self.calls.append((name, kwargs))
        return self.original(model, name, **kwargs)


# ----- item 1: --optim and its flags with --method ------------------------------------------------


def test_an_adapter_trains_with_any_rankwise_optimizer(cli_env, tmp_path, monkeypatch):
    build = RecordingBuild(monkeypatch)
    assert finetune("--method", "lora", "--rank", "4", "--optim", "galore", "--optim-args", "rank=2",
                    "--update-proj-gap", "1", "--out", str(tmp_path / "galore")) == 0
    assert build.calls == [("galore", {"lr": 3e-3, "rank": 2, "update_proj_gap": 1})]
    assert finetune("--method", "lora", "--rank", "4", "--out", str(tmp_path / "adamw")) == 0
    assert len(build.calls) == 1  # plain AdamW on the adapter: torch's, no rankwise build
    galore, adamw = adapter_tensors(tmp_path / "galore"), adapter_tensors(tmp_path / "adamw")
    assert galore.keys() == adamw.keys()
    assert any(not torch.equal(galore[k], adamw[k]) for k in galore)  # the optimizer took effect
    assert json.loads((tmp_path / "galore" / "rankwise_run.json").read_text())["setup"]["optimizer"] == "galore"


@pytest.mark.slow
def test_loraplus_is_reachable_by_its_flag_and_by_optim_args(cli_env, tmp_path, monkeypatch):
    build = RecordingBuild(monkeypatch)
    assert finetune("--method", "lora", "--rank", "4", "--loraplus-lr-ratio", "16", "--out", str(tmp_path / "a")) == 0
    assert finetune("--method", "lora", "--rank", "4", "--optim-args", "loraplus_lr_ratio=16",
                    "--out", str(tmp_path / "b")) == 0
    assert finetune("--method", "lora", "--rank", "4", "--out", str(tmp_path / "plain")) == 0
    assert build.calls == [("adamw", {"lr": 3e-3, "loraplus_lr_ratio": 16.0})] * 2
    flag, option, plain = (adapter_tensors(tmp_path / d) for d in ("a", "b", "plain"))
    assert all(torch.equal(flag[k], option[k]) for k in flag)
    assert any(not torch.equal(flag[k], plain[k]) for k in flag)


def test_layerwise_mode_reaches_the_adapter_optimizer(cli_env, tmp_path, monkeypatch):
    build = RecordingBuild(monkeypatch)
    assert finetune("--method", "lora", "--rank", "4", "--layerwise", "--out", str(tmp_path / "a")) == 0
    assert build.calls == [("adamw", {"lr": 3e-3, "layerwise": True})]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--method", "lora", "--optim", "nonexistent"], "unknown optimizer 'nonexistent'"),
    (["finetune", "--method", "lora", "--scale", "9"], "unknown option(s) scale"),
    (["finetune", "--method", "lora", "--layerwise", "--scale", "9"], "unknown option(s) scale"),
    (["finetune", "--method", "lora", "--optim-args", "nonsense=1"], "unknown option(s) nonsense"),
    (["finetune", "--method", "lora", "--optim-target-modules", "q_proj"], "with --method it trains the method's"),
    (["finetune", "--method", "lora", "--accumulation-steps", "2"], "accumulation_steps applies to layerwise mode"),
    (["finetune", "--alpha", "4"], "--alpha applies to an adapter; give --method"),
    (["finetune", "--targets", "q_proj"], "--targets applies to an adapter"),
    (["finetune", "--loraplus-lr-ratio", "16"], "loraplus_lr_ratio raises the learning rate of adapters' B factors"),
    (["finetune", "--export-peft", "x"], "--export-peft applies to an adapter"),
    (["finetune", "--rank", "4"], "unknown option(s) rank"),
    (["finetune", "--method", "lora", "--loraplus-lr-ratio", "4", "--optim", "galore"],
     "loraplus_lr_ratio is offered for"),
    (["pretrain", "--parametrize", "lowrank", "--rank", "4", "--optim", "nonexistent"], "unknown optimizer 'nonexistent'"),
    (["pretrain", "--parametrize", "lowrank", "--rank", "4", "--scale", "2"], "unknown option(s) scale"),
    (["pretrain", "--optim", "galore", "--method-args", "rank=0"], "option rank must be an integer >= 1"),
    (["bench", "--base-steps", "3", "--model", "somewhere", "--data", "x.txt"], "--base-steps chooses the embedded base"),
    (["bench", "--model", "somewhere"], "--model needs --data"),
    (["finetune", "--model", "somewhere", "--data", "x.txt", "--preset", "small"], "--preset sizes the embedded model"),
    (["finetune", "--model", "somewhere", "--data", "x.txt", "--base-steps", "2"], "--base-steps chooses the embedded"),
])
def test_flags_that_do_not_apply_are_refused_before_training(cli_env, argv, message, capsys):
    base = BASE if argv[0] == "finetune" and "--model" not in argv else []
    fast = ["--steps", "2", "--no-progress"] if argv[0] == "bench" else FAST
    assert main([argv[0], *fast, *argv[1:], *base]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "==" not in captured.out  # nothing was trained


# ----- item 2: rank / lr 0 refused --------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--rank", "0", "argument --rank: must be a positive integer (>= 1), got 0"),
    ("--lr", "0", "argument --lr: must be a positive finite number (> 0), got 0"),
    ("--lr", "-0.001", "argument --lr: must be a positive finite number"),
    ("--steps", "0", "argument --steps: must be a positive integer"),
    ("--batch-size", "0", "argument --batch-size: must be a positive integer"),
    ("--seq-len", "1", "argument --seq-len: must be at least 2"),
    ("--alpha", "0", "argument --alpha: must be a positive finite number"),
    ("--save-steps", "0", "argument --save-steps: must be a positive integer"),
    ("--dtype", "fp16", "argument --dtype: invalid choice: 'fp16'"),
])
def test_zero_and_invalid_values_are_refused_not_replaced(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--method", "lora", flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ----- item 3: pretrain --parametrize lowrank ---------------------------------------------------


def test_pretrain_lowrank_needs_a_rank_and_its_output_feeds_finetune(cli_env, tmp_path, capsys):
    assert run("pretrain", "--parametrize", "lowrank") == 2
    assert "--parametrize lowrank needs --rank" in capsys.readouterr().err
    out = tmp_path / "lowrank"
    assert run("pretrain", "--parametrize", "lowrank", "--rank", "8", "--out", str(out)) == 0
    assert (out / "rankwise_compressed.json").is_file() and (out / "tokenizer.json").is_file()
    from rankwise.data.models import load_model_dir

    loaded = load_model_dir(out)
    assert any(type(m).__name__ == "FactorizedLinear" for m in loaded.model.modules())
    assert run("finetune", "--model", str(out), "--data", str(text_file(tmp_path / "text")),
               "--out", str(tmp_path / "next")) == 0


# ----- item 4: your own text on the embedded model ------------------------------------------------


def test_own_text_on_the_embedded_model(cli_env, tmp_path, capsys):
    one_file = text_file(tmp_path / "text", paragraphs=30)
    assert finetune("--data", str(one_file), "--method", "lora", "--rank", "4", "--out", str(tmp_path / "a")) == 0
    printed = capsys.readouterr().out
    assert "data: 1 document split at blank lines into 30 paragraphs" in printed
    assert "== lora on your data / tiny ==" in printed
    run_info = json.loads((tmp_path / "a" / "rankwise_run.json").read_text())
    assert run_info["base"] == {"embedded": "tiny", "base_steps": 3} and run_info["data"] == "your data / tiny"
    jsonl = tmp_path / "text" / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n" * 20}) + "\n" for i in range(12)))
    assert run("pretrain", "--data", str(jsonl), "--out", str(tmp_path / "b")) == 0
    assert "data: 12 documents:" in capsys.readouterr().out


# ----- item 5: outputs feed back in -------------------------------------------------------------


@pytest.mark.slow
def test_every_output_directory_is_a_valid_model_for_the_next_command(cli_env, tmp_path, capsys):
    from rankwise.data.models import load_model_dir

    text = str(text_file(tmp_path / "text"))
    assert run("pretrain", "--out", str(tmp_path / "pretrained")) == 0
    assert (tmp_path / "pretrained" / "tokenizer.json").is_file()
    assert run("finetune", "--model", str(tmp_path / "pretrained"), "--data", text,
               "--out", str(tmp_path / "full")) == 0
    assert (tmp_path / "full" / "tokenizer.json").is_file()
    assert run("finetune", "--model", str(tmp_path / "full"), "--data", text, "--method", "lora", "--rank", "4",
               "--out", str(tmp_path / "adapter")) == 0
    # an adapter directory as --model: its base (from the run record) with the adapter merged in
    loaded = load_model_dir(tmp_path / "adapter")
    assert not rankwise.adapters.adapter_layers(loaded.model) and "merged into" in loaded.how
    expected = rankwise.load_adapter(load_model_dir(tmp_path / "full").model, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.model), logits(expected), atol=1e-5, rtol=0)
    assert run("finetune", "--model", str(tmp_path / "adapter"), "--data", text, "--method", "pissa", "--rank", "4",
               "--out", str(tmp_path / "again")) == 0
    capsys.readouterr()
    assert run("pretrain", "--model", str(tmp_path / "again"), "--data", text, "--out", str(tmp_path / "more")) == 0


def test_a_run_without_out_saves_to_a_default_directory_and_says_where(cli_env, tmp_path, capsys):
    assert finetune("--method", "lora", "--rank", "4") == 0
    printed = capsys.readouterr().out
    found = re.search(r"saved the adapter to (rankwise-runs/finetune-lora-\d{8}-\d{6}) \(choose the place with --out\)",
                      printed)
    assert found, printed
    directory = tmp_path / found.group(1)
    assert (directory / "rankwise_adapter.json").is_file()
    assert run("finetune", "--model", str(directory), "--data", str(text_file(tmp_path / "text")),
               "--out", str(tmp_path / "next")) == 0


def test_an_out_that_is_a_file_fails_before_training(cli_env, tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    assert finetune("--method", "lora", "--out", str(afile)) == 2
    captured = capsys.readouterr()
    assert "exists and is not a directory" in captured.err and "==" not in captured.out
    assert afile.read_text() == "keep me"
    assert finetune("--method", "lora", "--out", str(afile / "below")) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


# ----- item 6: PEFT's file names only in PEFT's format --------------------------------------------


class DenseDelta(AdapterLayer):
    """A test-only adapter with a full (not low-rank) trained update: PEFT's LoRA cannot hold it."""

    def __init__(self, base, rank, alpha, **kwargs):
        super().__init__(base, rank, alpha, **kwargs)
        self.delta = torch.nn.Parameter(torch.zeros(self.out_features, self.in_features, **self.factory))

    def initialize(self, stats=None):
        with torch.no_grad():
            self.delta.normal_(std=0.01, generator=torch.Generator(self.delta.device).manual_seed(0))

    def delta_weight(self):
        return self.delta


def test_saved_adapters_use_peft_names_only_in_peft_format(cli_env, tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    assert finetune("--method", "lora", "--rank", "4", "--out", str(tmp_path / "lora")) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    ours = rankwise.load_adapter(base_model(), tmp_path / "lora")
    theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path / "lora")
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    # not expressible in PEFT: rankwise's names only, and stale PEFT files from an earlier save removed
    register_for_test(monkeypatch, ADAPTERS, "dense", DenseDelta, supports=frozenset(LINEAR_LIKE))
    model = rankwise.adapt(make_llama(), "dense", targets=["q_proj"])
    rankwise.save_adapter(model, tmp_path / "lora")
    assert not (tmp_path / "lora" / "adapter_config.json").exists()
    assert not (tmp_path / "lora" / "adapter_model.safetensors").exists()
    torch.testing.assert_close(logits(rankwise.load_adapter(make_llama(), tmp_path / "lora")), logits(model))
    with pytest.raises(RankwiseError, match=r"in rankwise's own format .* load it with rankwise.load_adapter"):
        rankwise.import_peft(make_llama(), tmp_path / "lora")
    peft_only = tmp_path / "peft-only"
    rankwise.export_peft(rankwise.adapt(make_llama(), "lora", rank=2), peft_only)
    with pytest.raises(RankwiseError, match="holds a PEFT adapter .* load it with rankwise.import_peft"):
        rankwise.load_adapter(make_llama(), peft_only)


def test_export_peft_writes_a_peft_adapter_with_the_trained_outputs(cli_env, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    out, exported = tmp_path / "pissa", tmp_path / "peft"
    assert finetune("--method", "pissa", "--rank", "4", "--out", str(out), "--export-peft", str(exported)) == 0
    assert f"wrote the adapter in PEFT's LoRA format to {exported} (exactly)" in capsys.readouterr().out
    ours = rankwise.load_adapter(base_model(), out)
    theirs = peft.PeftModel.from_pretrained(base_model(), exported)
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-4, rtol=0)


# ----- item 8: bench --setups on the default run ---------------------------------------------------


@pytest.mark.slow
def test_bench_setups_lora_on_the_default_run(cli_env, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--setups", "lora", "--steps", "2", *BASE, "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {suite: [row["setup"] for row in rows] for suite, rows in results["suites"].items()} == {"finetune": ["lora"]}
    assert main(["bench", "--setups", "lorra", "--steps", "2", "--out", str(out), "--no-progress"]) == 2
    assert "no suite of pretrain, finetune has the set-up(s) lorra" in capsys.readouterr().err


# ----- item 10: help, version, dtype, device, resume, intervals, progress, labels, warnings ---------


def test_help_states_every_flags_default_and_meaning(capsys):
    from rankwise.cli.common import HelpFormatter
    from rankwise.cli.main import WITH_PROGRESS, build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "compress" in WITH_PROGRESS and "--no-progress" in commands["compress"].format_help()
    for name in ("bench", "pretrain", "finetune"):  # compress's flags are the compression pillar's
        formatter = HelpFormatter(name)
        for action in commands[name]._actions:
            if not action.option_strings or action.dest in ("help", "help_method"):
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            shown = formatter._get_help_string(action)
            assert "default" in shown or action.nargs == 0, f"{name} {action.option_strings[0]}: help gives no default"
        text = commands[name].format_help()
        assert "--no-progress" in text
    text = commands["finetune"].format_help()
    for expected in ("--steps N             optimisation steps (default: 200)", "(default: 0.003 with --method",
                     "--seed SEED           seed of the batches and of random inits (default: 0)",
                     "the step uses the mean of their"):
        assert expected in text, expected
    assert "summed" not in text
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and re.fullmatch(r"rankwise \S+\n", capsys.readouterr().out)


@pytest.mark.slow
def test_dtype_and_device_take_effect(cli_env, tmp_path, capsys):
    from safetensors import safe_open

    for dtype, torch_dtype in (("bf16", "BF16"), ("fp64", "F64")):
        out = tmp_path / dtype
        assert finetune("--dtype", dtype, "--out", str(out)) == 0
        with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {torch_dtype}
    assert "bf16 weights" in capsys.readouterr().out
    assert finetune("--method", "lora", "--rank", "4", "--device", "cpu", "--out", str(tmp_path / "cpu")) == 0
    if not torch.cuda.is_available():
        assert finetune("--method", "lora", "--device", "cuda", "--out", str(tmp_path / "gpu")) == 2
        assert "torch sees no CUDA device; use --device cpu" in capsys.readouterr().err
    assert finetune("--method", "lora", "--device", "tpu9", "--out", str(tmp_path / "x")) == 2
    assert "unknown device 'tpu9'" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_steps_save_steps_and_resume(cli_env, tmp_path, capsys):
    common = ["--method", "lora", "--rank", "4", "--steps", "4", "--eval-steps", "1"]
    assert finetune(*common, "--save-steps", "2", "--out", str(tmp_path / "a")) == 0
    result = json.loads((tmp_path / "a" / "rankwise_run.json").read_text())["result"]
    assert [row["step"] for row in result["history"] if "val_loss" in row] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # a checkpoint is a model directory too
    from rankwise.data.models import load_model_dir

    assert not rankwise.adapters.adapter_layers(load_model_dir(tmp_path / "a" / "checkpoint-2").model)
    capsys.readouterr()
    assert finetune(*common, "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "checkpoint-2")) == 0
    assert "(resumed from step 2)" in capsys.readouterr().out
    straight, resumed = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((tmp_path / "b" / "rankwise_run.json").read_text())["result"]["history"] == result["history"]
    assert finetune("--method", "lora", "--rank", "8", "--steps", "4", "--eval-steps", "1", "--out",
                    str(tmp_path / "c"), "--resume", str(tmp_path / "a" / "checkpoint-2")) == 2
    assert "was saved by another run (rank: saved 4, now 8)" in capsys.readouterr().err


@pytest.mark.slow
def test_no_progress_silences_every_bar(cli_env, tmp_path, capfd):
    assert main(["finetune", *BASE, "--method", "lora", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--out", str(tmp_path / "loud")]) == 0
    assert "it/s" in capfd.readouterr().err  # rankwise's bar and transformers' loading / saving bars
    assert finetune("--method", "lora", "--out", str(tmp_path / "quiet")) == 0
    assert run("pretrain", "--out", str(tmp_path / "quiet-pretrain")) == 0
    assert "it/s" not in capfd.readouterr().err


def test_the_finetune_table_shows_the_loss_before_finetuning(cli_env, tmp_path, capsys):
    from rankwise.training import evaluate

    assert finetune("--method", "lora", "--rank", "4", "--out", str(tmp_path / "a")) == 0
    header, _, values = capsys.readouterr().out.splitlines()[1:4]
    columns = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", values.strip())))
    result = json.loads((tmp_path / "a" / "rankwise_run.json").read_text())["result"]
    assert float(columns["start loss"]) == pytest.approx(result["initial_val_loss"], abs=1e-4)
    assert "early loss" in columns and not any(c.startswith("loss@") for c in columns)
    from rankwise.bench import embedded_workload
    from rankwise.bench.runner import RunConfig

    workload = embedded_workload("finetune", "tiny", RunConfig(batch_size=2, seq_len=32), from_base=True, base_steps=3)
    assert result["initial_val_loss"] == pytest.approx(evaluate(base_model(), workload.eval_data), abs=1e-5)


def test_a_galore_rank_at_the_width_warns_of_more_state_than_adamw(cli_env, tmp_path):
    with pytest.warns(RuntimeWarning, match=r"galore: rank 128 >= min\(m, n\).*more optimizer state than AdamW"):
        assert run("pretrain", "--optim", "galore", "--rank", "128", "--steps", "1", "--out", str(tmp_path / "a")) == 0


def test_the_readme_method_table_lists_every_registered_method(capsys):
    from rankwise.cli.methods import PILLARS

    assert main(["methods", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    for pillar in PILLARS.values():
        assert all(f"`{name}`" in table for name in pillar.registry.names())
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert table in readme, "README's method table is out of date: paste `rankwise methods --markdown` into it"
    assert main(["methods", "--markdown", "--pillar", "optim"]) == 2


# ----- issue 9: checkpointing and bf16 on the command line; real model directories -----------------


@pytest.mark.slow
def test_gradient_checkpointing_and_bf16_report_their_peak_memory(cli_env, tmp_path, capsys):
    peaks = {}
    for name, flags in (("plain", []), ("checkpointed", ["--gradient-checkpointing"]),
                        ("reentrant", ["--gradient-checkpointing", "reentrant"]), ("bf16", ["--bf16"])):
        assert main(["finetune", *BASE, "--method", "lora", "--rank", "4", "--steps", "2", "--batch-size", "4",
                     "--seq-len", "128", "--no-progress", *flags, "--out", str(tmp_path / name)]) == 0
        printed = capsys.readouterr().out
        peaks[name] = float(re.search(r"peak memory ([\d.]+) MB", printed).group(1))
        assert json.loads((tmp_path / name / "rankwise_run.json").read_text())["result"]["peak_memory_mb"] == \
            pytest.approx(peaks[name], abs=0.05)
    assert peaks["checkpointed"] < peaks["plain"] and peaks["reentrant"] < peaks["plain"]
    assert peaks["bf16"] != peaks["plain"]


def _adapter_supports(model) -> bool:
    try:
        rankwise.adapt(model, "lora", rank=2)
    except RankwiseError:
        return False
    return True


@pytest.mark.slow
def test_finetune_a_gpt2_directory(cli_env, tmp_path, capsys):
    directory, text = gpt2_dir(tmp_path / "gpt2"), str(text_file(tmp_path / "text"))
    assert run("finetune", "--model", str(directory), "--data", text, "--out", str(tmp_path / "full")) == 0
    assert run("finetune", "--model", str(directory), "--data", text, "--optim", "galore", "--rank", "4",
               "--out", str(tmp_path / "galore")) == 0
    printed = capsys.readouterr().out
    assert "causal language modelling" not in printed  # the default objective needs no note
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "galore").config.model_type == "gpt2"
    if not _adapter_supports(AutoModelForCausalLM.from_pretrained(directory)):
        pytest.skip("adapters on transformers' Conv1D arrive with the layer-types work of issue 9")
    assert run("finetune", "--model", str(directory), "--data", text, "--method", "lora", "--rank", "4",
               "--out", str(tmp_path / "lora")) == 0


@pytest.mark.slow
def test_finetune_a_llama_directory_with_an_adapter_and_fully(cli_env, tmp_path, capsys):
    directory, text = llama_dir(tmp_path / "llama"), str(text_file(tmp_path / "text"))
    assert run("finetune", "--model", str(directory), "--data", text, "--method", "lora", "--rank", "4",
               "--out", str(tmp_path / "lora")) == 0
    printed = capsys.readouterr().out
    assert re.search(r"val ppl\n.*\n lora .* \d+\.\d\d\n", printed) or "val ppl" in printed
    from transformers import AutoModelForCausalLM

    adapted = rankwise.load_adapter(AutoModelForCausalLM.from_pretrained(directory), tmp_path / "lora")
    assert len(rankwise.adapters.adapter_layers(adapted)) == 14
    assert run("finetune", "--model", str(directory), "--data", text, "--seq-len", "128") == 2
    assert "seq_len 128 exceeds the model's 64 positions; pass --seq-len 64 or less" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_an_encoder_with_its_masked_lm_head(cli_env, tmp_path, capsys):
    from transformers import AutoModel

    directory, text = bert_dir(tmp_path / "bert"), str(text_file(tmp_path / "text"))
    assert run("finetune", "--model", str(directory), "--data", text, "--out", str(tmp_path / "full")) == 0
    printed = capsys.readouterr().out
    assert "loss: masked language modelling" in printed
    values = printed.splitlines()[printed.splitlines().index(next(l for l in printed.splitlines() if "val ppl" in l)) + 2]
    assert re.search(r"\d+\.\d\d$", values.strip())  # masked-token perplexity
    assert run("finetune", "--model", str(directory), "--data", text, "--method", "lora", "--rank", "4",
               "--out", str(tmp_path / "lora")) == 0
    modules = json.loads((tmp_path / "lora" / "rankwise_adapter.json").read_text())["modules"]
    assert modules and all(name.startswith("encoder.") for name in modules)  # relative to BertModel
    encoder = rankwise.load_adapter(AutoModel.from_pretrained(directory), tmp_path / "lora")
    assert len(rankwise.adapters.adapter_layers(encoder)) == len(modules)


@pytest.mark.slow
def test_finetune_the_real_minilm_encoder_and_load_its_adapter_on_automodel(cli_env, minilm_path, tmp_path, capsys):
    from transformers import AutoModel

    from rankwise.data.models import load_model_dir

    text = str(text_file(tmp_path / "text"))
    out = tmp_path / "minilm-lora"
    assert run("finetune", "--model", minilm_path, "--data", text, "--method", "lora", "--rank", "4",
               "--targets", "query,value,dense", "--lr", "1e-2", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "loss: hidden-state fidelity" in printed
    result = json.loads((out / "rankwise_run.json").read_text())["result"]
    assert result["final_val_ppl"] is None and result["final_val_loss"] < result["initial_val_loss"]
    adapted = rankwise.load_adapter(AutoModel.from_pretrained(minilm_path), out)
    merged = load_model_dir(out).model
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(AutoModel.from_pretrained(minilm_path), ids), logits(adapted, ids), atol=1e-4)
