"""``rankwise bench``: train set-ups side by side and compare them."""

from __future__ import annotations

import argparse

from rankwise.bench.suites import SUITES
from rankwise.cli.common import (
    add_device_arguments,
    add_parser as new_parser,
    check_model_arguments,
    check_out_path,
    positive_int,
    refuse,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = new_parser(sub, "bench", "train set-ups side by side and compare them",
                        "Train set-ups side by side on the same data and seed; print a table per suite and write "
                        "results.json, results.csv and loss_curves.png to --out.")
    parser.add_argument("--suite", default=None,
                        help=f"comma-separated suites ({', '.join(SUITES)}); a named suite runs all its set-ups "
                             "(default: pretrain,finetune with their default set-ups)")
    parser.add_argument("--preset", default="quick", choices=["quick", "full"],
                        help="quick: the tiny model, minutes on a laptop CPU; full: the small model, longer runs, "
                             "every set-up")
    parser.add_argument("--setups", default=None, metavar="NAMES",
                        help="comma-separated set-up names to run, in whichever chosen suite has them "
                             "(default: the suites' default set-ups)")
    parser.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help="steps per set-up (default: the preset's, 150 quick / 400 full)")
    parser.add_argument("--base-steps", type=positive_int, default=None, metavar="N",
                        help="pretraining steps of the cached base the fine-tuning suites start from "
                             "(default: 400; not with --model)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="your model directory instead of the embedded model (needs --data; default: the embedded model)")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help="your .txt / .jsonl files instead of the embedded corpus (default: the corpus)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every set-up's batches and inits")
    parser.add_argument("--out", default="bench-out", metavar="DIR", help="directory for the tables and the plot")
    add_device_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rankwise.bench import run_bench as bench

    check_model_arguments(argparse.Namespace(model=args.model, preset=None, base_steps=args.base_steps))
    refuse(bool(args.model) and not args.data, "--model needs --data: give the .txt / .jsonl files to train on")
    check_out_path(Path(args.out))
    suites = [s.strip() for s in (args.suite or "pretrain,finetune").split(",") if s.strip()]
    bench(
        suites,
        preset=args.preset,
        out=args.out,
        setups=[s.strip() for s in args.setups.split(",") if s.strip()] if args.setups else None,
        steps=args.steps,
        model_dir=args.model,
        data_files=args.data,
        base_steps=args.base_steps,
        seed=args.seed,
        show_progress=not args.no_progress,
        every_setup=args.suite is not None,
        dtype=args.dtype,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        device=args.device,
    )
    return 0
