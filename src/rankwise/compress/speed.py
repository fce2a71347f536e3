"""When is a factorised layer faster than the dense one, and how fast is a model: measured, not assumed.

An ``m x n`` layer applied to ``t`` tokens costs ``t m n`` multiply-adds dense and
``t k (m + n)`` factorised, so in flops the break-even rank is ``m n / (m + n)``. In wall time
the two thin products (two kernel launches, a ``t x k`` intermediate, poorer cache use) break
even at a smaller rank, ``f m n / (m + n)`` with ``f < 1``. :func:`measure_break_even`
measures ``f``: for each shape it times ``x W^T`` against ``(x D^T) U^T`` at ranks
``g m n / (m + n)`` on a grid of ``g`` and interpolates the ``g`` where their median times
cross; ``f`` is the median over shapes and token counts.

``BREAK_EVEN_FACTOR`` is that measurement on the development machine (2-core x86 CPU, torch
2.13 CPU build, 1 and 2 threads, shapes 128x128 .. 1536x384, 128 and 2048 tokens):
``python -c "from rankwise.compress.speed import measure_break_even; print(measure_break_even())"``
gave 0.91 (per shape 0.74 for 128 x 128 up to 0.97 for 384 x 384; see docs/compression.md).
It is the default ``keep_dense_above`` of ``compress``; measure your own hardware and pass it.

:func:`forward_latency` times a model's forward (median of repeats after warm-up, no grad,
eval mode); :func:`compare_latency` times several models on the same batch interleaved, so
load changes on a shared machine hit them alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn

#: measured break-even factor f (see the module docstring); the default ``keep_dense_above``
BREAK_EVEN_FACTOR = 0.9

_SHAPES = ((128, 128), (384, 128), (384, 384), (1536, 384))
_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)


def _median_seconds(function, repeats: int) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def break_even_fraction(
    out_features: int, in_features: int, tokens: int, *, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, repeats: int = 20, seed: int = 0,
) -> float:
    """The ``g`` at which a rank ``g m n / (m + n)`` factorised layer is as fast as the dense one."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=generator).to(device=device, dtype=dtype)
    dense = nn.Linear(in_features, out_features).to(device=device, dtype=dtype)
    dense_time = _median_seconds(lambda: dense(x), repeats)
    break_even = out_features * in_features / (out_features + in_features)
    previous = None
    for fraction in _GRID:
        rank = max(1, int(fraction * break_even))
        down = nn.Linear(in_features, rank, bias=False).to(device=device, dtype=dtype)
        up = nn.Linear(rank, out_features).to(device=device, dtype=dtype)
        relative = _median_seconds(lambda: up(down(x)), repeats) / dense_time
        if relative >= 1.0:
            if previous is None:
                return fraction
            (g0, r0), g1 = previous, fraction
            return g0 + (1.0 - r0) * (g1 - g0) / (relative - r0)
        previous = (fraction, relative)
    return _GRID[-1]


def measure_break_even(
    shapes: Sequence[tuple[int, int]] = _SHAPES, tokens: Sequence[int] = (128, 2048), **kwargs: Any
) -> float:
    """The median break-even fraction ``f`` over ``shapes`` (out, in) and token counts."""
    return statistics.median(break_even_fraction(m, n, t, **kwargs) for m, n in shapes for t in tokens)


def _run(model: nn.Module, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


@torch.no_grad()
def forward_latency(model: nn.Module, batch: Any, *, repeats: int = 10) -> float:
    """Median seconds of ``model(batch)`` (eval mode, no grad) after warm-up."""
    was_training = model.training
    model.eval()
    try:
        return _median_seconds(lambda: _run(model, batch), repeats)
    finally:
        model.train(was_training)


@torch.no_grad()
def compare_latency(models: dict[str, nn.Module], batch: Any, *, repeats: int = 10) -> dict[str, float]:
    """Median seconds of each model's forward on ``batch``, the models timed in turn, round after round."""
    modes = {name: model.training for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for model in models.values():
            model.eval()
            for _ in range(3):
                _run(model, batch)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                _run(model, batch)
                times[name].append(time.perf_counter() - start)
    finally:
        for name, model in models.items():
            model.train(modes[name])
    return {name: statistics.median(values) for name, values in times.items()}
