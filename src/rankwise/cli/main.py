"""``rankwise`` command: bench, pretrain, finetune, compress, inspect, methods.

Every training command runs on the embedded default (corpus, tokenizer, tiny/small LLaMA,
cached base checkpoint) or on ``--model DIR`` (a Hugging Face model directory, or what a
rankwise command wrote with ``--out``) with ``--data`` text / JSONL files (``--data`` alone
trains the embedded model on your text). A command that takes a method documents it with
``--help-method NAME`` and passes it options with ``--method-args k=v,...``. ``--help`` on a
command lists every flag with its default.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Sequence

from rankwise.cli import bench, compress, finetune, inspect, methods, pretrain
from rankwise.cli.common import HelpFormatter, add_progress_argument
from rankwise.errors import RankwiseError

#: every sub-command: a module with ``add_parser(sub)`` (which sets ``run``) and ``run(args)``
COMMANDS = (bench, pretrain, finetune, compress, inspect, methods)
#: the commands that load, train or save models: each takes --no-progress
WITH_PROGRESS = ("bench", "pretrain", "finetune", "compress")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("rankwise")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description=__doc__.splitlines()[0],
                                     epilog="`rankwise COMMAND --help` lists a command's flags with their defaults.")
    parser.add_argument("--version", action="version", version=f"rankwise {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    for name, command_parser in sub.choices.items():
        command_parser.formatter_class = HelpFormatter  # every command's --help shows the defaults
        if name in WITH_PROGRESS:
            add_progress_argument(command_parser)
    return parser


@contextlib.contextmanager
def progress_bars_off() -> Iterator[None]:
    """No progress bars from transformers and huggingface_hub (loading / saving weights) inside
    this block; their previous setting afterwards."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    transformers_on, hub_on = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if hub_on:
            enable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = progress_bars_off() if getattr(args, "no_progress", False) else contextlib.nullcontext()
    try:
        with quiet:
            return args.run(args)
    except RankwiseError as exc:
        print(f"rankwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
