"""The row types of the parametrisation, compression and diagnostics suites.

``pretrain_*.py``, ``compress_*.py`` and ``analyze_*.py`` in this package define ``CASES``
lists of these rows; tests/test_pretrain.py, tests/test_compress.py and
tests/test_analyze.py run their common tests on every row and fail when a registered
method has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class PretrainCase:
    """One parametrisation in the common suite.

    trainable_per_layer(n_in, n_out, r): the paper's trainable weights of one replaced
    ``n_out x n_in`` layer at rank r (the bias, kept as initialised, not counted); rank: the
    rank the suite passes (None for methods sized by their options); replaces(name): whether
    the method's default targets include the layer ``name`` (structured_ffn: the FFN only).
    """

    id: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    trainable_per_layer: Callable[[int, int, int], int] = lambda n_in, n_out, r: r * (n_in + n_out)
    rank: int | None = 4
    replaces: Callable[[str], bool] = lambda name: True


@dataclass(frozen=True)
class CompressCase:
    """One compression method in the common suite.

    needs_data: it reads calibration batches; weight_error_factor: its weight-space error
    ``||W - W_k||_F`` is at most this multiple of the Eckart-Young optimum at the same rank
    (None for methods that minimise another error, e.g. on activations).
    """

    id: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    needs_data: bool = False
    weight_error_factor: float | None = None


@dataclass(frozen=True)
class DiagnosticCase:
    """One known answer of a per-matrix diagnostic: ``diagnostic(matrix(), **options) == expected``
    within ``rel`` (relative) / ``abs`` (absolute), each sized to the answer's own error."""

    id: str
    diagnostic: str
    matrix: Callable[[], torch.Tensor]
    expected: float
    rel: float = 1e-9
    abs: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateCase:
    """One known answer of a base-vs-tuned diagnostic: ``diagnostic(W0, W1, **options) == expected``
    where ``matrices()`` returns ``(W0, W1)``."""

    id: str
    diagnostic: str
    matrices: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    expected: float
    rel: float = 1e-9
    abs: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
