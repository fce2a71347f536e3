"""``rankwise finetune``: fine-tune the base model with an adapter or an optimizer."""

from __future__ import annotations

import argparse

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
from rankwise.cli.options import parse_targets


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("finetune", help="fine-tune the base model with an adapter or an optimizer")
    add_run_arguments(parser, steps=200)
    add_optim_arguments(parser, default="adamw")
    parser.add_argument("--method", default=None, help="adapter method (rankwise.methods()); omit for full fine-tuning")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--targets", default="all-linear", help="adapter targets: all-linear, suffixes, re:<regex>")
    add_method_arguments(parser, ("adapters", "optim"), "--method, else --optim",
                          {"adapters": "--method-args k=v,...",
                           "optim": "--optim-args k=v,...; also --method-args when there is no --method"})
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rankwise.adapters import save_adapter

    config = run_config(args)
    if args.method:
        options = {**method_values("adapters", args.method, args.method_args), "targets": parse_targets(args.targets)}
        if args.alpha is not None:
            options["alpha"] = args.alpha
        setup = SetUp(args.method, "adapter", args.method, lr=args.lr or 3e-3, rank=args.rank or 8, options=options)
    else:
        setup = optim_setup(args, f"full fine-tuning {args.optim}", default_lr=3e-4, method_args=True)
    _, model = train_and_report(setup, make_workload(args, "finetune", config, from_base=True), config)
    if args.out:
        if args.method:
            save_adapter(model, args.out)
            print(f"saved the adapter to {args.out}")
        else:
            model.save_pretrained(args.out, safe_serialization=True)
            print(f"saved the fine-tuned model to {args.out}")
    return 0
