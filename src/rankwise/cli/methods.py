"""Every pillar's methods on the command line: ``rankwise methods``, ``--help-method NAME`` and
``--method-args k=v,...``, all read from the pillars' registries and Option declarations.

``PILLARS`` is the one table: pillar name -> its registry and its ``method_options(name)``
(the method's :class:`rankwise.options.Option` declarations), so a method registered in any
pillar is listed, documented and configurable from the command line with no CLI change.
"""

from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rankwise import adapters, optim
from rankwise.analyze import DIAGNOSTICS
from rankwise.analyze import method_options as diagnostic_options
from rankwise.compress import COMPRESSORS
from rankwise.compress import method_options as compressor_options
from rankwise.errors import RankwiseError
from rankwise.options import Option, describe, parse_values
from rankwise.pretrain import PARAMETRISATIONS
from rankwise.pretrain import method_options as parametrisation_options
from rankwise.registry import Registry


@dataclass(frozen=True)
class Pillar:
    """A pillar as the command line sees it."""

    name: str
    kind: str  # what one of its methods is called in messages
    registry: Registry
    method_options: Callable[[str], dict[str, Option]]
    label: str = ""  # its row label in the README's method table


PILLARS: dict[str, Pillar] = {
    "adapters": Pillar("adapters", "adapter method", adapters.ADAPTERS, adapters.method_options,
                       "adapters (`rankwise.methods()`)"),
    "optim": Pillar("optim", "optimizer", optim.OPTIMIZERS, optim.method_options,
                    "optimizers (`rankwise.optim.names()`)"),
    "pretrain": Pillar("pretrain", "pretraining parametrisation", PARAMETRISATIONS, parametrisation_options,
                       "pretraining (`rankwise.pretrain`)"),
    "compress": Pillar("compress", "compression method", COMPRESSORS, compressor_options,
                       "compression (`rankwise.compress`)"),
    "analyze": Pillar("analyze", "diagnostic", DIAGNOSTICS, diagnostic_options,
                      "diagnostics (`rankwise.analyze`)"),
}


def method_values(pillar: str, name: str, text: str | None) -> dict[str, Any]:
    """``--method-args`` text for method ``name`` of ``pillar``, parsed and checked against its declarations."""
    entry = PILLARS[pillar]
    entry.registry.entry(name)  # an unknown name: RankwiseError listing the known ones
    return parse_values(entry.method_options(name), text, owner=f"{entry.kind} {name!r}")


def listing(pillar: str | None = None, pattern: str | None = None) -> list[dict[str, str]]:
    """Rows of ``rankwise methods``: name, pillar, family, citation; sorted by pillar then name."""
    if pillar is not None and pillar not in PILLARS:
        raise RankwiseError(f"unknown pillar {pillar!r}; known: {', '.join(PILLARS)}")
    chosen = [PILLARS[pillar]] if pillar else list(PILLARS.values())
    return [
        {"name": entry.name, "pillar": p.name, "family": entry.family, "paper": entry.citation}
        for p in chosen
        for entry in p.registry.entries()
        if pattern is None or fnmatch.fnmatchcase(entry.name, pattern)
    ]


def format_listing(rows: list[dict[str, str]]) -> str:
    columns = ("name", "pillar", "family", "paper")
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in columns[:-1]}
    lines = ["  ".join(c.ljust(widths.get(c, 0)) for c in columns).rstrip()]
    lines += ["  ".join(row[c].ljust(widths.get(c, 0)) for c in columns).rstrip() for row in rows]
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's method table: one row per pillar, every registered name (``rankwise methods --markdown``)."""
    lines = ["| pillar | registered methods |", "|---|---|"]
    for pillar in PILLARS.values():
        lines.append(f"| {pillar.label} | {', '.join(f'`{name}`' for name in pillar.registry.names())} |")
    return "\n".join(lines)


def method_help(pillars: Sequence[str], name: str, args_flag: dict[str, str]) -> str:
    """``--help-method NAME``: the method's citation and its options in every one of ``pillars``
    that registers ``name``; RankwiseError listing the known names when none does."""
    sections = []
    for pillar in pillars:
        p = PILLARS[pillar]
        if name not in p.registry:
            continue
        entry = p.registry.entry(name)
        lines = [f"{p.kind} {name} (pillar {pillar}, family {entry.family})", f"  {entry.citation}",
                 f"  options ({args_flag[pillar]}):"]
        lines += [f"    {line}" for line in describe(p.method_options(name))]
        sections.append("\n".join(lines))
    if not sections:
        known = sorted({n for pillar in pillars for n in PILLARS[pillar].registry.names()})
        raise RankwiseError(f"no method {name!r} in {' or '.join(pillars)}; known: {', '.join(known)}")
    return "\n\n".join(sections)


class HelpMethod(argparse.Action):
    """``--help-method NAME``: print the method's options and exit, like ``--help``."""

    def __init__(self, option_strings, dest, *, pillars: Sequence[str], args_flag: dict[str, str], **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.pillars = tuple(pillars)
        self.args_flag = args_flag

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            text = method_help(self.pillars, values, self.args_flag)
        except RankwiseError as exc:
            parser.exit(2, f"rankwise: error: {exc}\n")
        print(text)  # to stdout, as --help
        parser.exit(0)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("methods", help="list every pillar's methods with family and paper")
    parser.add_argument("pattern", nargs="?", default=None,
                        help="shell-style name pattern, e.g. 'lora*' (default: every name)")
    parser.add_argument("--pillar", default=None,
                        help="adapters, optim, pretrain, compress or analyze (default: every pillar)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the README's method table (every registered name per pillar) instead")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        if args.pattern or args.pillar:
            raise RankwiseError("--markdown prints every pillar's methods; drop the pattern and --pillar")
        print(markdown_table())
        return 0
    rows = listing(args.pillar, args.pattern)
    if not rows:
        raise RankwiseError(f"no method matches {args.pattern!r}" + (f" in {args.pillar}" if args.pillar else ""))
    print(format_listing(rows))
    return 0
