"""What each ``rankwise`` sub-command does (argument parsing lives in main.py)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rankwise.bench.report import format_table
from rankwise.bench.runner import RunConfig, Workload, run_setup
from rankwise.bench.suites import SetUp
from rankwise.cli.methods import format_listing, listing, method_values
from rankwise.cli.options import optim_options, parse_targets
from rankwise.errors import RankwiseError


def run_bench(args: argparse.Namespace) -> int:
    from rankwise.bench import run_bench as bench

    bench(
        [s.strip() for s in (args.suite or "pretrain,finetune").split(",") if s.strip()],
        preset=args.preset,
        out=args.out,
        setups=[s.strip() for s in args.setups.split(",")] if args.setups else None,
        steps=args.steps,
        model_dir=args.model,
        data_files=args.data,
        base_steps=args.base_steps,
        seed=args.seed,
        show_progress=not args.no_progress,
        every_setup=args.suite is not None,
    )
    return 0


def _run_config(args: argparse.Namespace) -> RunConfig:
    if args.steps < 1:
        raise RankwiseError(f"--steps must be >= 1, got {args.steps}")
    eval_every = max(1, args.steps // 6)
    return RunConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_every=eval_every,
                     eval_batches=8, warmup_steps=min(10, args.steps // 10), early_step=eval_every, seed=args.seed)


def _workload(args: argparse.Namespace, split: str, config: RunConfig, *, from_base: bool) -> Workload:
    from rankwise.bench import embedded_workload, user_workload

    if args.model or args.data:
        if not (args.model and args.data):
            raise RankwiseError("--model and --data go together: give your model directory and your text/JSONL files")
        return user_workload(args.model, args.data, config)
    return embedded_workload(split, args.preset, config, from_base=from_base, base_steps=args.base_steps)


def _optim_setup(args: argparse.Namespace, name: str, default_lr: float, *, method_args: bool = False) -> SetUp:
    """The optimizer set-up of ``--optim`` and its flags; with ``method_args`` the optimizer is the
    command's method and ``--method-args`` are its options too."""
    options = optim_options(args)
    if method_args and args.method_args:
        typed = method_values("optim", args.optim, args.method_args)
        repeated = sorted(set(typed) & set(options))
        if repeated:
            raise RankwiseError(f"{', '.join(repeated)} given twice (--method-args and another optimizer flag); give it once")
        options.update(typed)
    if args.optim == "adamw" and options == {"targets": "all-linear"}:
        return SetUp(name, "full", lr=args.lr or default_lr)
    rank_in_optim_args = options.pop("rank", None)
    rank = args.rank if args.rank is not None else rank_in_optim_args
    return SetUp(name, "optim", args.optim, lr=args.lr or default_lr, rank=rank, options=options)


def _train_and_report(setup: SetUp, workload: Workload, config: RunConfig):
    from tqdm.auto import tqdm

    with tqdm(total=config.steps, desc=setup.name, unit="step") as bar:
        row, model = run_setup(setup, workload, config, progress=bar)
    print(format_table([row], title=f"== {setup.name} on {workload.name} =="))
    return row, model


def run_pretrain(args: argparse.Namespace) -> int:
    config = _run_config(args)
    if args.parametrize:
        options = method_values("pretrain", args.parametrize, args.method_args)
        setup = SetUp(f"{args.parametrize}", "parametrize", args.parametrize, lr=args.lr or 3e-3, rank=args.rank,
                      options=options)
    else:
        setup = _optim_setup(args, f"pretrain {args.optim}", default_lr=3e-3, method_args=True)
    _, model = _train_and_report(setup, _workload(args, "pretrain", config, from_base=False), config)
    if args.out:
        model.save_pretrained(args.out, safe_serialization=True)
        print(f"saved the trained model to {args.out}")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from rankwise.adapters import save_adapter

    config = _run_config(args)
    if args.method:
        options = {**method_values("adapters", args.method, args.method_args), "targets": parse_targets(args.targets)}
        if args.alpha is not None:
            options["alpha"] = args.alpha
        setup = SetUp(args.method, "adapter", args.method, lr=args.lr or 3e-3, rank=args.rank or 8, options=options)
    else:
        setup = _optim_setup(args, f"full fine-tuning {args.optim}", default_lr=3e-4, method_args=True)
    _, model = _train_and_report(setup, _workload(args, "finetune", config, from_base=True), config)
    if args.out:
        if args.method:
            save_adapter(model, args.out)
            print(f"saved the adapter to {args.out}")
        else:
            model.save_pretrained(args.out, safe_serialization=True)
            print(f"saved the fine-tuned model to {args.out}")
    return 0


def run_compress(args: argparse.Namespace) -> int:
    import torch

    from rankwise.compress import compress, save_compressed
    from rankwise.training import evaluate

    options = method_values("compress", args.method, args.method_args)
    config = RunConfig(batch_size=args.batch_size, seq_len=args.seq_len, eval_batches=8, seed=args.seed)
    # The base was pretrained on the code split: compression is judged on its held-out part.
    workload = _workload(args, "pretrain", config, from_base=True)
    model = workload.make_model()
    batches = workload.batches(config)
    calibration = [next(batches) for _ in range(4)]
    params_before = sum(p.numel() for p in model.parameters())
    loss_before = evaluate(model, workload.eval_data)
    with torch.no_grad():
        compress(model, args.method, ratio=args.ratio, data=calibration, targets=parse_targets(args.targets), **options)
    params_after = sum(p.numel() for p in model.parameters())
    loss_after = evaluate(model, workload.eval_data)
    print(f"{args.method} at ratio {args.ratio}: parameters {params_before:,} -> {params_after:,} "
          f"({params_after / params_before:.3f} of the whole model)")
    print(f"validation loss {loss_before:.4f} -> {loss_after:.4f}; "
          f"perplexity {math.exp(loss_before):.2f} -> {math.exp(loss_after):.2f}")
    if args.out:
        save_compressed(model, Path(args.out))
        print(f"saved the compressed model to {args.out}")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    rows = listing(args.pillar, args.pattern)
    if not rows:
        raise RankwiseError(f"no method matches {args.pattern!r}" + (f" in {args.pillar}" if args.pillar else ""))
    print(format_listing(rows))
    return 0
