"""``rankwise`` command: bench, pretrain, finetune, compress, methods.

Every training command runs on the embedded default (corpus, tokenizer, tiny/small LLaMA,
cached base checkpoint) or on ``--model DIR`` (a Hugging Face model directory, or what a
rankwise command wrote with ``--out``) with ``--data`` text / JSONL files (``--data`` alone
trains the embedded model on your text). A command that takes a method documents it with
``--help-method NAME`` and passes it options with ``--method-args k=v,...``. ``--help`` on a
command lists every flag with its default.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rankwise.cli import bench, compress, finetune, methods, pretrain
from rankwise.cli.common import add_progress_argument
from rankwise.errors import RankwiseError

#: every sub-command: a module with ``add_parser(sub)`` (which sets ``run``) and ``run(args)``
COMMANDS = (bench, pretrain, finetune, compress, methods)
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
    for name in WITH_PROGRESS:
        add_progress_argument(sub.choices[name])
    return parser


def silence_progress() -> None:
    """No progress bars from transformers and huggingface_hub (loading / saving weights)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - huggingface_hub always comes with transformers
        return
    disable_progress_bars()


def restore_progress() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        from huggingface_hub.utils import enable_progress_bars
    except ImportError:  # pragma: no cover
        return
    enable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "no_progress", False)
    if quiet:
        silence_progress()
    try:
        return args.run(args)
    except RankwiseError as exc:
        print(f"rankwise: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if quiet:
            restore_progress()


if __name__ == "__main__":
    raise SystemExit(main())
