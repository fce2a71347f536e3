"""What several ``rankwise`` commands share: argument groups, the run configuration, the
workload (embedded default or the user's model and files), the optimizer set-up of ``--optim``."""

from __future__ import annotations

import argparse

from rankwise.bench.runner import RunConfig, Workload, run_setup
from rankwise.bench.setup import SetUp
from rankwise.cli.methods import method_values
from rankwise.cli.options import optim_options
from rankwise.errors import RankwiseError


def add_run_arguments(parser: argparse.ArgumentParser, *, steps: int) -> None:
    parser.add_argument("--model", help="a Hugging Face model directory (default: the embedded model)")
    parser.add_argument("--data", nargs="+", help="your .txt / .jsonl files (with --model)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="embedded model size")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for the trained result")
    parser.add_argument("--base-steps", type=int, default=None, help="pretraining steps of the cached base")


def add_optim_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--optim", default=default, help="optimizer name (rankwise.optim.names())")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--update-proj-gap", type=int, default=None)
    parser.add_argument("--scale", type=float, default=None)
    parser.add_argument("--proj-type", default=None)
    parser.add_argument("--optim-target-modules", default="all-linear",
                        help="all-linear, comma-separated suffixes, or re:<regex>")
    parser.add_argument("--optim-args", default=None, help='more hyperparameters: "k=v,k=v"')
    parser.add_argument("--layerwise", action="store_true",
                        help="step each parameter inside backward from its gradient hook (rankwise.optim.layerwise)")
    parser.add_argument("--accumulation-steps", type=int, default=None,
                        help="with --layerwise: step every N micro-batches (--steps counts micro-batches; "
                             "the step uses their summed gradient)")


def add_method_arguments(parser: argparse.ArgumentParser, pillars: tuple[str, ...], method_flags: str,
                          args_flag: dict[str, str]) -> None:
    from rankwise.cli.methods import HelpMethod

    parser.add_argument("--help-method", metavar="NAME", action=HelpMethod, pillars=pillars, args_flag=args_flag,
                        help=f"list the options of method NAME ({' or '.join(pillars)}) with defaults, then exit")
    parser.add_argument("--method-args", default=None, metavar="K=V,...",
                        help=f"options of the method ({method_flags}), checked against its declarations; "
                             "see --help-method")


def run_config(args: argparse.Namespace) -> RunConfig:
    if args.steps < 1:
        raise RankwiseError(f"--steps must be >= 1, got {args.steps}")
    eval_every = max(1, args.steps // 6)
    return RunConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_every=eval_every,
                     eval_batches=8, warmup_steps=min(10, args.steps // 10), early_step=eval_every, seed=args.seed)


def make_workload(args: argparse.Namespace, split: str, config: RunConfig, *, from_base: bool) -> Workload:
    from rankwise.bench import embedded_workload, user_workload

    if args.model or args.data:
        if not (args.model and args.data):
            raise RankwiseError("--model and --data go together: give your model directory and your text/JSONL files")
        return user_workload(args.model, args.data, config)
    return embedded_workload(split, args.preset, config, from_base=from_base, base_steps=args.base_steps)


def optim_setup(args: argparse.Namespace, name: str, default_lr: float, *, method_args: bool = False) -> SetUp:
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


def train_and_report(setup: SetUp, workload: Workload, config: RunConfig, hooks=()):
    from tqdm.auto import tqdm

    from rankwise.bench.report import format_table

    with tqdm(total=config.steps, desc=setup.name, unit="step") as bar:
        row, model = run_setup(setup, workload, config, progress=bar, hooks=hooks)
    print(format_table([row], title=f"== {setup.name} on {workload.name} =="))
    return row, model
