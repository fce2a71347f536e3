"""Selecting which Linear-like modules of a model a method applies to.

A module is a candidate when it is of the ``kind`` a pillar asks for; by default Linear-like
(``nn.Linear``, transformers' ``Conv1D``, bitsandbytes' quantized Linear: see
:mod:`rankwise.layers`). ``targets`` is one of
- ``"all-linear"``: every candidate except the output head (``lm_head`` or any layer whose
  weight is tied to an input embedding) -- the PEFT / Trainer convention;
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
from rankwise.layers import is_linear_like

Targets = Union[str, Sequence[str]]

_HEAD_NAMES = ("lm_head", "score", "classifier", "cls")


def _is_output_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _HEAD_NAMES:
        return True
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return head is module


def linear_names(model: nn.Module) -> list[str]:
    """Names of all Linear-like modules in ``model``, in module order."""
    return [n for n, m in model.named_modules() if is_linear_like(m)]


def match_targets(model: nn.Module, targets: Targets = "all-linear", *, kind: type | None = None) -> list[str]:
    """Return the names of the candidate modules selected by ``targets``: Linear-like modules,
    or instances of ``kind`` when given.

    Raises RankwiseError (listing some candidate module names) when nothing matches.
    """
    if kind is None:
        accepts, kind_name = is_linear_like, "Linear-like (Linear, Conv1D, quantized Linear)"
    else:
        accepts, kind_name = (lambda module: isinstance(module, kind)), kind.__name__
    modules = [(n, m) for n, m in model.named_modules() if n and accepts(m)]
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
            f"targets {targets!r} matched no {kind_name} module; "
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
