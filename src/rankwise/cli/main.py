"""``rankwise`` command: bench, pretrain, finetune, compress, inspect, methods.

Every training command runs on the embedded default (corpus, tokenizer, tiny/small LLaMA,
cached base checkpoint) or on ``--model DIR`` (a Hugging Face model directory) with
``--data`` text / JSONL files. A command that takes a method documents it with
``--help-method NAME`` and passes it options with ``--method-args k=v,...``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rankwise.cli import bench, compress, finetune, inspect, methods, pretrain
from rankwise.errors import RankwiseError

#: every sub-command: a module with ``add_parser(sub)`` (which sets ``run``) and ``run(args)``
COMMANDS = (bench, pretrain, finetune, compress, inspect, methods)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except RankwiseError as exc:
        print(f"rankwise: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
