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
from rankwise.bench.runner import RunConfig, Workload, run_device, run_setup
from rankwise.bench.suites import SUITE_RUNS, SUITE_WORKLOAD, SUITES, SetUp, SuiteRun, select_setups
from rankwise.bench.sweep import run_suite_sweep
from rankwise.errors import RankwiseError
from rankwise.training import CAUSAL_LM

#: bench preset -> (model preset, run configuration, whether non-default set-ups run too)
PRESETS: dict[str, tuple[str, RunConfig, bool]] = {
    "quick": ("tiny", RunConfig(steps=150, batch_size=8, seq_len=128, eval_every=25, eval_batches=8, early_step=25), False),
    # ~1 s/step for the small model on a 2-core CPU: a few minutes per set-up there, far less on a GPU
    "full": ("small", RunConfig(steps=400, batch_size=8, seq_len=256, eval_every=50, eval_batches=16,
                                warmup_steps=20, early_step=50), True),
}


def _eval_data(tokens, config: RunConfig, masking, what: str) -> list[dict]:
    from rankwise.data.batches import eval_batches, masked_eval_batches

    if tokens.numel() < config.seq_len:
        raise RankwiseError(
            f"the validation part of {what} holds {tokens.numel()} tokens, fewer than one window of "
            f"seq_len={config.seq_len}; give more text or a smaller --seq-len"
        )
    if masking is not None:
        return masked_eval_batches(tokens, batch_size=config.batch_size, seq_len=config.seq_len, masking=masking,
                                   max_batches=config.eval_batches, seed=config.seed)
    return eval_batches(tokens, batch_size=config.batch_size, seq_len=config.seq_len, max_batches=config.eval_batches)


def _user_documents(data_files: Sequence[str]):
    from rankwise.data.corpus import load_text_files, split_for_training

    return split_for_training(load_text_files(data_files))


def embedded_workload(
    split: str, model_preset: str, config: RunConfig, *, from_base: bool, base_steps: int | None = None,
    data_files: Sequence[str] | None = None, progress: bool = True,
) -> Workload:
    """The embedded corpus ``split`` (or the user's ``data_files``, split by
    :func:`rankwise.data.corpus.split_for_training`) and the embedded model: a fresh init, or
    the cached base when ``from_base`` (built on first use, with a progress bar if ``progress``)."""
    from rankwise.data.batches import encode_documents
    from rankwise.data.corpus import load_corpus
    from rankwise.data.models import BASE_STEPS, build_model, load_base
    from rankwise.data.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    if data_files:
        documents = _user_documents(data_files)
        train_docs, val_docs, how, data_name = documents.train, documents.validation, documents.how, "your data"
    else:
        train_docs, val_docs = load_corpus(split, "train"), load_corpus(split, "validation")
        how, data_name = "", f"embedded {split}"
    train_tokens = encode_documents(train_docs, tokenizer)
    eval_data = _eval_data(encode_documents(val_docs, tokenizer), config, None, data_name)
    if not from_base:
        def make_model():
            return build_model(model_preset, vocab_size=len(tokenizer), seed=config.seed)
        hidden = make_model().config.hidden_size
        base = None
    else:
        base_model = load_base(model_preset, steps=base_steps, progress=progress)

        def make_model():
            return copy.deepcopy(base_model)
        hidden = base_model.config.hidden_size
        base = {"embedded": model_preset, "base_steps": BASE_STEPS[model_preset] if base_steps is None else base_steps}
    return Workload(f"{data_name} / {model_preset}", make_model, train_tokens, eval_data, hidden,
                    tokenizer=tokenizer, base=base, data_how=how)


def user_workload(model_dir: str, data_files: Sequence[str], config: RunConfig) -> Workload:
    """The user's model directory (:func:`rankwise.data.models.load_model_dir`: the objective
    follows the model type) and text / JSONL files (split by
    :func:`rankwise.data.corpus.split_for_training`)."""
    from rankwise.data.batches import Masking, encode_documents
    from rankwise.data.models import load_model_dir
    from rankwise.training import MASKED_LM, hidden_state_fidelity

    documents = _user_documents(data_files)  # a bad data file fails before the model is loaded
    loaded = load_model_dir(model_dir)
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if positions is not None and config.seq_len > positions:
        raise RankwiseError(f"seq_len {config.seq_len} exceeds the model's {positions} positions; pass --seq-len "
                            f"{positions} or less")
    tokenizer = loaded.tokenizer
    masking = Masking.for_tokenizer(tokenizer) if loaded.objective != "causal-lm" else None
    if loaded.objective == "masked-lm":
        objective = MASKED_LM
    elif loaded.objective == "hidden-states":
        objective = hidden_state_fidelity(copy.deepcopy(loaded.model))
    else:
        objective = CAUSAL_LM
    train_tokens = encode_documents(documents.train, tokenizer)
    eval_data = _eval_data(encode_documents(documents.validation, tokenizer), config, masking, "your data")
    model = loaded.model

    def make_model():
        return copy.deepcopy(model)

    config_of = model.config
    hidden = getattr(config_of, "hidden_size", None) or getattr(config_of, "n_embd", None) or getattr(config_of, "d_model")
    return Workload(f"your data / {model_dir}", make_model, train_tokens, eval_data, int(hidden),
                    tokenizer=tokenizer, objective=objective, masking=masking, adapter_root=loaded.adapter_root,
                    base={"path": str(Path(model_dir).resolve())}, data_how=documents.how,
                    objective_name=loaded.objective)


def plan_setups(
    suites: Sequence[str], setups: Sequence[str] | None, include_all: bool
) -> dict[str, list[SetUp]]:
    """The set-ups each suite runs: its default ones (or all), or, with ``setups``, the named
    ones each suite has (a suite with none of them is left out); a name no chosen suite has is
    refused, listing what they have."""
    if not setups:
        return {suite: select_setups(suite, None, include_all) for suite in suites}
    for suite in suites:
        select_setups(suite, None, True)  # an unknown suite: RankwiseError listing the known ones
    known = {suite: {s.name for s in SUITES[suite]} for suite in suites}
    missing = [name for name in setups if not any(name in names for names in known.values())]
    if missing:
        listing = "; ".join(f"{suite}: {', '.join(s.name for s in SUITES[suite])}" for suite in suites)
        raise RankwiseError(f"no suite of {', '.join(suites)} has the set-up(s) {', '.join(missing)}; they have -- {listing}")
    plan = {suite: select_setups(suite, [n for n in setups if n in known[suite]], include_all)
            for suite in suites if any(n in known[suite] for n in setups)}
    return plan


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
    dtype: str = "fp32",
    bf16: bool = False,
    gradient_checkpointing: str | None = None,
    device: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run the suites, print their tables and write results.json / results.csv / loss_curves.png.

    Each suite runs its default set-ups; all of them with ``every_setup`` or preset ``full``;
    with ``setups``, the named ones each suite has (see :func:`plan_setups`). ``model_dir``
    replaces the embedded model, ``data_files`` the embedded corpus (each alone or both);
    ``dtype``, ``bf16``, ``gradient_checkpointing`` and ``device``: see :class:`RunConfig`.
    """
    from tqdm.auto import tqdm

    if preset not in PRESETS:
        raise RankwiseError(f"unknown bench preset {preset!r}; known: {', '.join(PRESETS)}")
    if model_dir is not None and not data_files:
        raise RankwiseError("--model needs --data: give the text / JSONL files to train your model on")
    model_preset, config, include_all = PRESETS[preset]
    include_all = include_all or every_setup
    if steps is not None and steps < 1:
        raise RankwiseError(f"steps must be >= 1, got {steps}")
    config = replace(config, seed=seed, dtype=dtype, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
                     device=device, **({"steps": steps} if steps else {}))
    config = replace(config, eval_every=min(config.eval_every, config.steps), early_step=min(config.early_step, config.steps),
                     warmup_steps=min(config.warmup_steps, config.steps // 10))
    run_device(config)  # an unusable device fails before anything is built
    plan = plan_setups(list(suites), list(setups) if setups else None, include_all)

    results: dict[str, list[dict[str, Any]]] = {}
    written: list[Path] = []
    total = sum(len(v) for v in plan.values()) * config.steps
    users = user_workload(model_dir, data_files, config) if model_dir else None
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
            if not suite_setups and suite in SUITE_RUNS:  # a measurement suite (speed, memory): its hook only
                written += SUITE_RUNS[suite](SuiteRun(config, model_preset, Path(out), base_steps, model_dir,
                                                      data_files, show_progress))
                continue
            split, from_base = SUITE_WORKLOAD[suite]
            workload = users or embedded_workload(split, model_preset, config, from_base=from_base,
                                                  base_steps=base_steps, data_files=data_files,
                                                  progress=show_progress)
            if workload.data_how:
                print(f"data: {workload.data_how}")
            rows = []
            for setup in suite_setups:
                bar.set_postfix_str(f"{suite}: {setup.name}")
                row, _ = run_setup(setup, workload, config, progress=bar)
                rows.append(row)
            results[suite] = rows
            how = [f"{config.steps} steps", f"{config.dtype} weights"] + (["bf16 autocast"] if config.bf16 else []) + (
                [f"{config.gradient_checkpointing} gradient checkpointing"] if config.gradient_checkpointing else [])
            print("\n" + format_table(rows, title=f"== {suite} ({workload.name}, {', '.join(how)}) =="))
            if suite in SUITE_RUNS:
                written += SUITE_RUNS[suite](SuiteRun(config, model_preset, Path(out), base_steps, model_dir,
                                                      data_files, show_progress))
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
        "device": str(run_device(config)),
    }
    paths = write_results(Path(out), results, meta) + written
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return results


__all__ = ["PRESETS", "SUITES", "RunConfig", "SetUp", "embedded_workload", "plan_setups", "run_bench", "run_setup",
           "user_workload"]
