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
from rankwise.errors import RankwiseError


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("finetune", help="fine-tune the base model with an adapter or an optimizer")
    add_run_arguments(parser, steps=200)
    add_optim_arguments(parser, default="adamw")
    parser.add_argument("--method", default=None, help="adapter method (rankwise.methods()); omit for full fine-tuning")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--targets", default="all-linear", help="adapter targets: all-linear, suffixes, re:<regex>")
    parser.add_argument("--welore-lrc-only", type=float, nargs="?", const=0.5, default=None, metavar="RATIO",
                        help="WeLore: compress the base to RATIO of its weights (default 0.5) and fine-tune only "
                             "its low-rank components (rankwise.compress.trainable_lrc)")
    add_method_arguments(parser, ("adapters", "optim"), "--method, else --optim",
                          {"adapters": "--method-args k=v,...",
                           "optim": "--optim-args k=v,...; also --method-args when there is no --method"})
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rankwise.adapters import save_adapter

    config = run_config(args)
    if args.welore_lrc_only is not None:
        if args.method or args.optim != "adamw" or args.optim_args:
            raise RankwiseError("--welore-lrc-only fine-tunes the compressed base's low-rank components with AdamW "
                                "(WeLore's recipe); drop --method / --optim / --optim-args")
        setup = SetUp(f"welore {args.welore_lrc_only} LRC only", "compress_lrc", "welore", lr=args.lr or 3e-4,
                      ratio=args.welore_lrc_only)
    elif args.method:
        options = {**method_values("adapters", args.method, args.method_args), "targets": parse_targets(args.targets)}
        if args.alpha is not None:
            options["alpha"] = args.alpha
        setup = SetUp(args.method, "adapter", args.method, lr=args.lr or 3e-3, rank=args.rank or 8, options=options)
    else:
        setup = optim_setup(args, f"full fine-tuning {args.optim}", default_lr=3e-4, method_args=True)
    _, model = train_and_report(setup, make_workload(args, "finetune", config, from_base=True), config)
    if args.out:
        if args.welore_lrc_only is not None:
            from rankwise.compress import save_compressed

            save_compressed(model, args.out)
            print(f"saved the fine-tuned compressed model to {args.out} (rankwise.load_compressed)")
        elif args.method:
            save_adapter(model, args.out)
            print(f"saved the adapter to {args.out}")
        else:
            model.save_pretrained(args.out, safe_serialization=True)
            print(f"saved the fine-tuned model to {args.out}")
    return 0
