"""Rows of the table-driven suites, one file per family of methods.

``adapters_<family>.py`` files define ``CASES: list[AdapterCase]``; the common adapter
suite (tests/test_adapters.py) runs every test on every row of every such file. Adding a
method's row never touches the suite itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class AdapterCase:
    """One adapter method in the common suite.

    needs_data: the method takes ``data=`` batches; identity_at_init: the adapted model's output
    equals the base model's before training; trainable_per_layer(n_in, n_out, r): the paper's
    trainable-parameter count for one adapted ``n_out x n_in`` layer at rank r; quantizes_base: the
    method replaces the base by its quantization (LoftQ), so the original weight is not kept and
    merges are lossy; lr: the Adam learning rate of the suite's "training lowers the loss" steps
    (1e-2 suits LoRA-scaled updates; a method whose one step moves the update much more, e.g. a
    matrix shared by many blocks, gives the smaller rate its paper trains with); shared_trainable(r):
    trainable parameters shared by all adapted layers of one adapt call at rank r (Compacter's
    slow weights, Uni-LoRA's and SAID's one global vector), counted once and added to the
    per-layer sum.
    """

    id: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    needs_data: bool = False
    identity_at_init: bool = True
    trainable_per_layer: Callable[[int, int, int], int] = lambda n_in, n_out, r: r * (n_in + n_out)
    quantizes_base: bool = False
    lr: float = 1e-2
    shared_trainable: Callable[[int], int] = lambda r: 0


def collect(prefix: str) -> list[Any]:
    """Concatenate ``CASES`` of every module ``<prefix>*.py`` in this package, in name order."""
    rows: list[Any] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith(prefix):
            rows.extend(importlib.import_module(f"{__name__}.{info.name}").CASES)
    return rows
