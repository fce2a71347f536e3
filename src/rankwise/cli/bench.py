"""``rankwise bench``: train set-ups side by side and compare them."""

from __future__ import annotations

import argparse

from rankwise.bench.suites import SUITES


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="train set-ups side by side and compare them")
    parser.add_argument("--suite", default=None,
                       help=f"comma-separated suites ({', '.join(SUITES)}); a named suite runs all its set-ups "
                            "(default: pretrain,finetune with their default set-ups)")
    parser.add_argument("--preset", default="quick", help="quick (default, minutes) or full (longer, larger)")
    parser.add_argument("--setups", default=None, help="comma-separated set-up names to run")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps per set-up")
    parser.add_argument("--base-steps", type=int, default=None, help="pretraining steps of the cached base")
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
