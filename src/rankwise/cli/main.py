"""``rankwise`` command: bench, pretrain, finetune, compress, methods.

Every training command runs on the embedded default (corpus, tokenizer, tiny/small LLaMA,
cached base checkpoint) or on ``--model DIR`` (a Hugging Face model directory) with
``--data`` text / JSONL files. A command that takes a method documents it with
``--help-method NAME`` and passes it options with ``--method-args k=v,...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rankwise.bench.suites import SUITES
from rankwise.errors import RankwiseError


def _add_run_arguments(parser: argparse.ArgumentParser, *, steps: int) -> None:
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


def _add_optim_arguments(parser: argparse.ArgumentParser, default: str) -> None:
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


def _add_method_arguments(parser: argparse.ArgumentParser, pillars: tuple[str, ...], method_flags: str,
                          args_flag: dict[str, str]) -> None:
    from rankwise.cli.methods import HelpMethod

    parser.add_argument("--help-method", metavar="NAME", action=HelpMethod, pillars=pillars, args_flag=args_flag,
                        help=f"list the options of method NAME ({' or '.join(pillars)}) with defaults, then exit")
    parser.add_argument("--method-args", default=None, metavar="K=V,...",
                        help=f"options of the method ({method_flags}), checked against its declarations; "
                             "see --help-method")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="train set-ups side by side and compare them")
    bench.add_argument("--suite", default=None,
                       help=f"comma-separated suites ({', '.join(SUITES)}); a named suite runs all its set-ups "
                            "(default: pretrain,finetune with their default set-ups)")
    bench.add_argument("--preset", default="quick", help="quick (default, minutes) or full (longer, larger)")
    bench.add_argument("--setups", default=None, help="comma-separated set-up names to run")
    bench.add_argument("--steps", type=int, default=None, help="override the preset's steps per set-up")
    bench.add_argument("--base-steps", type=int, default=None, help="pretraining steps of the cached base")
    bench.add_argument("--model", default=None)
    bench.add_argument("--data", nargs="+", default=None)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default="bench-out")
    bench.add_argument("--no-progress", action="store_true")

    pretrain = sub.add_parser("pretrain", help="train a model from scratch with one optimizer / parametrisation")
    _add_run_arguments(pretrain, steps=300)
    _add_optim_arguments(pretrain, default="adamw")
    pretrain.add_argument("--parametrize", default=None, help="e.g. lowrank (rankwise.pretrain names)")
    _add_method_arguments(pretrain, ("pretrain", "optim"), "--parametrize, else --optim",
                          {"pretrain": "--method-args k=v,...",
                           "optim": "--optim-args k=v,...; also --method-args when there is no --parametrize"})

    finetune = sub.add_parser("finetune", help="fine-tune the base model with an adapter or an optimizer")
    _add_run_arguments(finetune, steps=200)
    _add_optim_arguments(finetune, default="adamw")
    finetune.add_argument("--method", default=None, help="adapter method (rankwise.methods()); omit for full fine-tuning")
    finetune.add_argument("--alpha", type=float, default=None)
    finetune.add_argument("--targets", default="all-linear", help="adapter targets: all-linear, suffixes, re:<regex>")
    _add_method_arguments(finetune, ("adapters", "optim"), "--method, else --optim",
                          {"adapters": "--method-args k=v,...",
                           "optim": "--optim-args k=v,...; also --method-args when there is no --method"})

    compress = sub.add_parser("compress", help="factorise a trained model's Linear layers")
    compress.add_argument("--model", default=None, help="HF model directory (default: the embedded base)")
    compress.add_argument("--data", nargs="+", default=None, help="calibration / evaluation text (with --model)")
    compress.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    compress.add_argument("--method", default="svd")
    compress.add_argument("--ratio", type=float, required=True, help="fraction of the targeted parameters kept, in (0, 1)")
    compress.add_argument("--targets", default="all-linear")
    compress.add_argument("--batch-size", type=int, default=8)
    compress.add_argument("--seq-len", type=int, default=128)
    compress.add_argument("--out", default=None)
    compress.add_argument("--base-steps", type=int, default=None, help="pretraining steps of the cached base")
    compress.add_argument("--seed", type=int, default=0)
    _add_method_arguments(compress, ("compress",), "--method", {"compress": "--method-args k=v,..."})

    methods = sub.add_parser("methods", help="list every pillar's methods with family and paper")
    methods.add_argument("pattern", nargs="?", default=None, help="shell-style name pattern, e.g. 'lora*'")
    methods.add_argument("--pillar", default=None, help="adapters, optim, pretrain, compress or analyze")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from rankwise.cli import commands

        return getattr(commands, f"run_{args.command}")(args)
    except RankwiseError as exc:
        print(f"rankwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
