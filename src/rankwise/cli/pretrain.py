"""``rankwise pretrain``: train a model from scratch with an optimizer (``--optim``) or a low-rank
parametrisation (``--parametrize``, trained by ``--optim``).

On the embedded data the model is a fresh ``--preset`` LLaMA; with ``--model DIR`` the run
continues training that model on ``--data``. The result goes to ``--out`` (else a fresh
directory under ``rankwise-runs/``) with its tokenizer: a valid ``--model`` for ``finetune``.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from rankwise.bench.runner import Checkpointing
from rankwise.bench.setup import SetUp
from rankwise.cli.common import (
    add_device_arguments,
    add_method_arguments,
    add_model_arguments,
    add_optim_arguments,
    add_parser as new_parser,
    add_training_arguments,
    check_model_arguments,
    make_workload,
    method_optimizer,
    optim_setup,
    refuse,
    run_config,
    train_and_report,
)
from rankwise.cli.methods import method_values
from rankwise.cli.outputs import output_dir, write_model
from rankwise.errors import RankwiseError

PRETRAIN_LR = 3e-3


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = new_parser(sub, "pretrain", "train a model from scratch with an optimizer or a low-rank parametrisation",
                        __doc__)
    add_model_arguments(parser, base=False)
    add_training_arguments(parser, steps=300, lr_help=f"default: {PRETRAIN_LR:g}")
    method = parser.add_argument_group("parametrisation")
    method.add_argument("--parametrize", default=None, metavar="NAME",
                        help="low-rank parametrisation of the Linear layers, e.g. lowrank (W = BA; needs --rank); "
                             "`rankwise methods --pillar pretrain` (default: none, dense weights)")
    add_optim_arguments(parser, default="adamw", with_method="--parametrize")
    add_device_arguments(parser)
    add_method_arguments(parser, ("pretrain", "optim"), "--parametrize, else --optim",
                          {"pretrain": "--method-args k=v,...",
                           "optim": "--optim-args k=v,...; also --method-args when there is no --parametrize"})
    parser.add_argument("--log-gradient-rank", type=int, nargs="?", const=10, default=None, metavar="EVERY",
                        help="record each layer's gradient stable / effective rank at step 1 and every EVERY steps "
                             "(default 10) into gradient_rank.json in --out (else the current directory)")
    parser.set_defaults(run=run)


def _parametrize_setup(args: argparse.Namespace) -> SetUp:
    options = method_values("pretrain", args.parametrize, args.method_args)
    refuse(args.rank is None, f"--parametrize {args.parametrize} needs --rank: the rank of every factorised layer "
                              "(e.g. --rank 32 on the 128-wide tiny model)")
    optimizer, optimizer_options = method_optimizer(args, "--parametrize")
    lr = PRETRAIN_LR if args.lr is None else args.lr
    return SetUp(args.parametrize, "parametrize", args.parametrize, lr=lr, rank=args.rank, options=options,
                 optimizer=optimizer, optimizer_options=optimizer_options)


def run(args: argparse.Namespace) -> int:
    check_model_arguments(args)
    config = run_config(args)
    setup = _parametrize_setup(args) if args.parametrize else optim_setup(args, f"pretrain {args.optim}", PRETRAIN_LR,
                                                                          method_args=True)
    out = output_dir(args.out, "pretrain", setup.name)
    recorder = gradient_recorder(args)
    workload = make_workload(args, "pretrain", config, from_base=False)
    write = partial(write_model, workload=workload, setup=setup, command="pretrain")
    checkpointing = Checkpointing(args.save_steps, out, lambda model, path: write(model, path)) \
        if args.save_steps else None
    row, model = train_and_report(setup, workload, config, args, checkpointing, hooks=(recorder,) if recorder else ())
    write(model, out, row=row)
    where = "given by --out" if args.out else "choose the place with --out"
    print(f"saved the trained model to {out} ({where}); it is a valid --model for finetune")
    if recorder:
        path = recorder.save(Path(out) / "gradient_rank.json")
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
