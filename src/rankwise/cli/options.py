"""Parsing of the Trainer-style option strings the commands accept."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from rankwise.errors import RankwiseError


def parse_targets(text: str) -> Any:
    """``all-linear``; ``re:<regex>``; or comma-separated module-name suffixes."""
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        return text[3:]
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_key_values(text: str | None) -> dict[str, Any]:
    """Trainer-style ``optim_args``: ``"rank=8,update_proj_gap=50,proj_type=std"``."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise RankwiseError(f"expected key=value in {text!r}, got {item!r}")
        try:
            values[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            values[key.strip()] = raw.strip()
    return values


def optim_options(args: argparse.Namespace) -> dict[str, Any]:
    options = parse_key_values(args.optim_args)
    for key in ("update_proj_gap", "scale", "proj_type"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    options["targets"] = parse_targets(args.optim_target_modules)
    if args.layerwise:
        options["layerwise"] = True
    if args.accumulation_steps is not None:
        options["accumulation_steps"] = args.accumulation_steps  # without --layerwise: build() says what to do
    return options
