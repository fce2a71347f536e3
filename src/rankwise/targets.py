"""Selecting which nn.Linear modules of a model a method applies to.

``targets`` is one of
- ``"all-linear"``: every ``nn.Linear`` except the output head (``lm_head`` or any Linear
  whose weight is tied to an input embedding) -- the PEFT / Trainer convention;
- a list (or tuple) of module-name suffixes: a module matches when its full name equals
  the entry or ends with ``"." + entry`` (``["q_proj", "v_proj"]``);
- any other string: a regular expression that must match the full module name
  (``re.fullmatch``), as in PEFT's ``target_modules``.
"""

from __future__ import annotations

import re
from typing import Sequence, Union

from torch import nn

from rankwise.errors import RankwiseError

Targets = Union[str, Sequence[str]]

_HEAD_NAMES = ("lm_head", "score", "classifier", "cls")


def _is_output_head(model: nn.Module, name: str, module: nn.Linear) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _HEAD_NAMES:
        return True
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return head is module


def linear_names(model: nn.Module) -> list[str]:
    """Names of all nn.Linear modules in ``model``, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def match_targets(model: nn.Module, targets: Targets = "all-linear", *, kind: type = nn.Linear) -> list[str]:
    """Return the names of the ``kind`` modules selected by ``targets``.

    Raises RankwiseError (listing some Linear module names) when nothing matches.
    """
    modules = [(n, m) for n, m in model.named_modules() if isinstance(m, kind) and n]
    if isinstance(targets, str) and targets == "all-linear":
        chosen = [n for n, m in modules if not _is_output_head(model, n, m)]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise RankwiseError(f"targets {targets!r} is not a valid regular expression: {exc}") from None
        chosen = [n for n, _ in modules if pattern.fullmatch(n)]
    elif isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets) and len(targets) > 0:
        chosen = [n for n, _ in modules if any(n == t or n.endswith("." + t) for t in targets)]
    else:
        raise RankwiseError(
            f"targets must be 'all-linear', a regex string or a non-empty list of module-name suffixes, got {targets!r}"
        )
    if not chosen:
        names = [n for n, _ in modules]
        sample = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise RankwiseError(
            f"targets {targets!r} matched no {kind.__name__} module; "
            f"the model has {len(names)} of them, e.g. {sample or '(none)'}"
        )
    return chosen


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of ``name`` and the attribute under which it holds the child."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``name`` was; return the module it replaced."""
    parent, child = get_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
