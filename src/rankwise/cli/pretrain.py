"""``rankwise pretrain``: train a model from scratch with one optimizer or parametrisation."""

from __future__ import annotations

import argparse
from pathlib import Path

from rankwise.bench.setup import SetUp
from rankwise.cli.common import (
    add_method_arguments,
    add_optim_arguments,
    add_run_arguments,
    make_workload,
    optim_setup,
    run_config,
    train_and_report,
)
from rankwise.cli.methods import method_values
from rankwise.errors import RankwiseError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("pretrain", help="train a model from scratch with one optimizer / parametrisation")
    add_run_arguments(parser, steps=300)
    add_optim_arguments(parser, default="adamw")
    parser.add_argument("--parametrize", default=None, help="e.g. lowrank (rankwise.pretrain names)")
    add_method_arguments(parser, ("pretrain", "optim"), "--parametrize, else --optim",
                          {"pretrain": "--method-args k=v,...",
                           "optim": "--optim-args k=v,...; also --method-args when there is no --parametrize"})
    parser.add_argument("--log-gradient-rank", type=int, nargs="?", const=10, default=None, metavar="EVERY",
                        help="record each layer's gradient stable / effective rank at step 1 and every EVERY steps "
                             "(default 10) into gradient_rank.json in --out (else the current directory)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = run_config(args)
    if args.parametrize:
        options = method_values("pretrain", args.parametrize, args.method_args)
        setup = SetUp(f"{args.parametrize}", "parametrize", args.parametrize, lr=args.lr or 3e-3, rank=args.rank,
                      options=options)
    else:
        setup = optim_setup(args, f"pretrain {args.optim}", default_lr=3e-3, method_args=True)
    recorder = gradient_recorder(args)
    workload = make_workload(args, "pretrain", config, from_base=False)
    _, model = train_and_report(setup, workload, config, hooks=(recorder,) if recorder else ())
    if args.out:
        model.save_pretrained(args.out, safe_serialization=True)
        print(f"saved the trained model to {args.out}")
    if recorder:
        path = recorder.save(Path(args.out or ".") / "gradient_rank.json")
        print(recorder.format_summary())
        print(f"wrote the gradient ranks (every {recorder.every} steps) to {path}")
    return 0


def gradient_recorder(args: argparse.Namespace):
    """The GradientRankCallback of ``--log-gradient-rank EVERY`` (None without the flag)."""
    if args.log_gradient_rank is None:
        return None
    if args.layerwise:
        raise RankwiseError("--log-gradient-rank needs the gradients after backward, and --layerwise consumes them "
                            "inside backward; drop one of the two")
    from rankwise.analyze import GradientRankCallback

    return GradientRankCallback(every=args.log_gradient_rank)
