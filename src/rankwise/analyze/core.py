"""The diagnostics pillar's contract: per-matrix and base-vs-tuned diagnostics, one registry.

Two kinds of diagnostic share ``DIAGNOSTICS``:

* a :class:`Diagnostic` turns one weight matrix into one number. :func:`model_report` runs
  every registered one on every targeted layer from one SVD per layer, so each receives the
  matrix and its singular values (descending, as :func:`rankwise.analyze.spectrum` returns
  them) and uses whichever it needs;
* an :class:`UpdateDiagnostic` turns a pair (base weight ``W0``, tuned weight ``W1``) of one
  layer into one number (intruder dimensions, ...). :func:`update_report` runs every
  registered one on every layer the two models share;
* a :class:`TrainingDiagnostic` turns a model and a task (training and evaluation batches)
  into one number by training copies of the model (the intrinsic dimension); no report runs
  them (each costs training runs), :func:`training_diagnostics` lists them.

``measure`` returns a float, or None where the quantity is undefined for that matrix and the
class docstring says why (a power-law fit needs enough non-zero eigenvalues, for instance);
the report then shows None for that layer.

**Adding a diagnostic** = one file in ``analyze/`` with the public function (the formula in
its docstring, the paper cited in the module docstring) and a :class:`Diagnostic` (or
:class:`UpdateDiagnostic`) subclass registered in ``DIAGNOSTICS`` under the name of its
report column (with family, paper and arXiv id), imported by ``analyze/__init__.py``;
options, if any, declared as :class:`rankwise.options.Option` in ``OPTIONS`` (checked once
here, values in ``self.options``). The public function returns the number, or a result
object whose ``float()`` is the number the report shows. Then one row in
``tests/cases/analyze_*.py`` with a known answer (``DiagnosticCase`` or ``UpdateCase``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from rankwise.errors import RankwiseError
from rankwise.options import Option, declared_options, resolve
from rankwise.registry import Registry


class _Configured(ABC):
    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, *, method: str = "", **options: Any) -> None:
        self.method = method or type(self).__name__
        self.options = resolve(declared_options(type(self)), options, owner=f"diagnostic {self.method!r}")


class Diagnostic(_Configured):
    """One number per weight matrix, computed from the matrix and its singular values."""

    @abstractmethod
    def measure(self, matrix: torch.Tensor, singular_values: torch.Tensor) -> float | None:
        """The diagnostic of ``matrix`` (2-D); ``singular_values`` are its singular values, descending."""


class UpdateDiagnostic(_Configured):
    """One number per layer from its base weight ``W0`` and its tuned weight ``W1`` (same shape)."""

    @abstractmethod
    def measure(self, base: torch.Tensor, tuned: torch.Tensor) -> float | None:
        """The diagnostic of the change ``base -> tuned`` (two 2-D tensors of one shape)."""


class TrainingDiagnostic(_Configured):
    """One number per model and task, measured by training copies of the model (the model is left as it was)."""

    @abstractmethod
    def measure(self, model: Any, train_batches: list[dict], eval_batches: list[dict]) -> float | None:
        """The diagnostic of ``model`` on the task the batches define (dicts the model accepts, with labels)."""


DIAGNOSTICS: Registry[type[_Configured]] = Registry("diagnostic")


def method_options(name: str) -> dict[str, Option]:
    """The options diagnostic ``name`` declares."""
    return declared_options(DIAGNOSTICS.get(name))


def matrix_diagnostics() -> list[str]:
    """Names of the registered per-matrix diagnostics (the columns of :func:`model_report`)."""
    return [name for name in DIAGNOSTICS.names() if issubclass(DIAGNOSTICS.get(name), Diagnostic)]


def update_diagnostics() -> list[str]:
    """Names of the registered base-vs-tuned diagnostics (the columns of :func:`update_report`)."""
    return [name for name in DIAGNOSTICS.names() if issubclass(DIAGNOSTICS.get(name), UpdateDiagnostic)]


def training_diagnostics() -> list[str]:
    """Names of the registered diagnostics measured by training runs (:class:`TrainingDiagnostic`)."""
    return [name for name in DIAGNOSTICS.names() if issubclass(DIAGNOSTICS.get(name), TrainingDiagnostic)]


def build(name: str, kind: type[_Configured], **options: Any) -> Any:
    """Diagnostic ``name`` configured with ``options``; RankwiseError when it is unknown or of the other kind."""
    cls = DIAGNOSTICS.get(name)
    if not issubclass(cls, kind):
        if issubclass(cls, TrainingDiagnostic):
            raise RankwiseError(f"diagnostic {name!r} is not a {kind.__name__}: it trains the model; call "
                                f"rankwise.analyze.{name}(model, train_batches, eval_batches) instead")
        other = "model_report" if issubclass(cls, Diagnostic) else "update_report"
        raise RankwiseError(f"diagnostic {name!r} is not a {kind.__name__}; it is one of {other}'s columns")
    return cls(method=name, **options)
