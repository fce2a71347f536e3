"""The diagnostics pillar's contract: per-matrix diagnostics and their registry.

A per-matrix diagnostic turns one weight matrix into one number. :func:`model_report` runs
every registered one on every targeted layer from one SVD per layer, so each receives the
matrix and its singular values (descending, as :func:`rankwise.analyze.spectrum` returns
them) and uses whichever it needs.

**Adding a diagnostic** = one file in ``analyze/`` with the public function (the formula in
its docstring, the paper cited in the module docstring) and a :class:`Diagnostic` subclass
registered in ``DIAGNOSTICS`` under the name of its ``model_report`` column (with family,
paper and arXiv id), imported by ``analyze/__init__.py``; options, if any, declared as
:class:`rankwise.options.Option` in ``OPTIONS`` (checked once here, values in
``self.options``). Then one row in ``tests/cases/analyze_*.py`` with a known answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from rankwise.options import Option, declared_options, resolve
from rankwise.registry import Registry


class Diagnostic(ABC):
    """One number per weight matrix, computed from the matrix and its singular values."""

    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, *, method: str = "", **options: Any) -> None:
        self.method = method or type(self).__name__
        self.options = resolve(declared_options(type(self)), options, owner=f"diagnostic {self.method!r}")

    @abstractmethod
    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float:
        """The diagnostic of ``matrix`` (2-D); ``singular_values`` are its singular values, descending."""


DIAGNOSTICS: Registry[type[Diagnostic]] = Registry("diagnostic")


def method_options(name: str) -> dict[str, Option]:
    """The options diagnostic ``name`` declares."""
    return declared_options(DIAGNOSTICS.get(name))
