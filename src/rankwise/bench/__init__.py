"""``rankwise bench``: train set-ups side by side and report comparable figures.

Presets: ``quick`` (default; the tiny model, a few minutes on a 2-core CPU) and ``full``
(the small model, longer runs, every set-up of each suite).
"""

from __future__ import annotations

import copy
import importlib
import platform
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from rankwise.bench.report import format_table, write_results
from rankwise.bench.runner import RunConfig, Workload, bench_device, run_setup
from rankwise.bench.suites import SUITE_WORKLOAD, SUITES, SetUp, select_setups
from rankwise.bench.sweep import run_suite_sweep
from rankwise.errors import RankwiseError

#: bench preset -> (model preset, run configuration, whether non-default set-ups run too)
PRESETS: dict[str, tuple[str, RunConfig, bool]] = {
    "quick": ("tiny", RunConfig(steps=150, batch_size=8, seq_len=128, eval_every=25, eval_batches=8, early_step=25), False),
    # ~1 s/step for the small model on a 2-core CPU: a few minutes per set-up there, far less on a GPU
    "full": ("small", RunConfig(steps=400, batch_size=8, seq_len=256, eval_every=50, eval_batches=16,
                                warmup_steps=20, early_step=50), True),
}


def embedded_workload(
    split: str, model_preset: str, config: RunConfig, *, from_base: bool, base_steps: int | None = None
) -> Workload:
    """The embedded corpus ``split`` and a model: a fresh init, or the cached base when ``from_base``."""
    from rankwise.data.batches import encode_documents, eval_batches
    from rankwise.data.corpus import load_corpus
    from rankwise.data.models import build_model, load_base
    from rankwise.data.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    train_tokens = encode_documents(load_corpus(split, "train"), tokenizer)
    val_tokens = encode_documents(load_corpus(split, "validation"), tokenizer)
    eval_data = eval_batches(val_tokens, batch_size=config.batch_size, seq_len=config.seq_len,
                             max_batches=config.eval_batches)
    if not from_base:
        def make_model():
            return build_model(model_preset, vocab_size=len(tokenizer), seed=config.seed)
        hidden = make_model().config.hidden_size
    else:
        base = load_base(model_preset, steps=base_steps)

        def make_model():
            return copy.deepcopy(base)
        hidden = base.config.hidden_size
    return Workload(f"embedded {split} / {model_preset}", make_model, train_tokens, eval_data, hidden)


def user_workload(model_dir: str, data_files: Sequence[str], config: RunConfig) -> Workload:
    """The user's HF model directory and text / JSONL files (5% held out for validation)."""
    from rankwise.data.batches import encode_documents, eval_batches
    from rankwise.data.corpus import load_text_files, split_documents
    from rankwise.data.models import load_user_model

    model, tokenizer = load_user_model(model_dir)
    train_docs, val_docs = split_documents(load_text_files(data_files))
    train_tokens = encode_documents(train_docs, tokenizer)
    val_tokens = encode_documents(val_docs, tokenizer)
    eval_data = eval_batches(val_tokens, batch_size=config.batch_size, seq_len=config.seq_len,
                             max_batches=config.eval_batches)

    def make_model():
        return copy.deepcopy(model)

    return Workload(f"user {model_dir}", make_model, train_tokens, eval_data, model.config.hidden_size)


def run_bench(
    suites: Sequence[str] = ("pretrain", "finetune"),
    *,
    preset: str = "quick",
    out: str | Path = "bench-out",
    setups: Sequence[str] | None = None,
    steps: int | None = None,
    model_dir: str | None = None,
    data_files: Sequence[str] | None = None,
    base_steps: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    every_setup: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Run the suites, print their tables and write results.json / results.csv / loss_curves.png.

    Each suite runs its default set-ups; all of them with ``every_setup`` or preset ``full``,
    or exactly those named in ``setups``.
    """
    from tqdm.auto import tqdm

    if preset not in PRESETS:
        raise RankwiseError(f"unknown bench preset {preset!r}; known: {', '.join(PRESETS)}")
    if (model_dir is None) != (not data_files):
        raise RankwiseError("--model and --data go together: give your model directory and your text/JSONL files")
    model_preset, config, include_all = PRESETS[preset]
    include_all = include_all or every_setup
    config = replace(config, seed=seed, **({"steps": steps} if steps else {}))
    if config.steps < 1:
        raise RankwiseError(f"steps must be >= 1, got {config.steps}")
    config = replace(config, eval_every=min(config.eval_every, config.steps), early_step=min(config.early_step, config.steps),
                     warmup_steps=min(config.warmup_steps, config.steps // 10))
    plan = {suite: select_setups(suite, list(setups) if setups else None, include_all) for suite in suites}

    results: dict[str, list[dict[str, Any]]] = {}
    total = sum(len(v) for v in plan.values()) * config.steps
    with tqdm(total=total, desc="bench", unit="step", disable=not show_progress) as bar:
        for suite, suite_setups in plan.items():
            module = importlib.import_module(f"rankwise.bench.suites.{suite}")
            if every_setup and getattr(module, "SWEEP", None):
                # a suite with a sweep, named: tune every set-up the same way (rankwise.bench.sweep)
                if model_dir:
                    raise RankwiseError(f"the {suite} sweep runs on the embedded workload; drop --model / --data")
                results[suite] = run_suite_sweep(module, preset, setups=setups, steps=steps, seed=seed, out=Path(out))
                bar.update(len(suite_setups) * config.steps)
                continue
            split, from_base = SUITE_WORKLOAD[suite]
            workload = (user_workload(model_dir, data_files, config) if model_dir
                        else embedded_workload(split, model_preset, config, from_base=from_base, base_steps=base_steps))
            rows = []
            for setup in suite_setups:
                bar.set_postfix_str(f"{suite}: {setup.name}")
                row, _ = run_setup(setup, workload, config, progress=bar)
                rows.append(row)
            results[suite] = rows
            print("\n" + format_table(rows, title=f"== {suite} ({workload.name}, {config.steps} steps) =="))
            if getattr(module, "NOTE", None):
                print(module.NOTE)
    meta = {
        "preset": preset,
        "model_preset": model_preset if model_dir is None else model_dir,
        "run_config": asdict(config),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": str(bench_device()),
    }
    paths = write_results(Path(out), results, meta)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return results


__all__ = ["PRESETS", "SUITES", "RunConfig", "SetUp", "run_bench", "run_setup"]
