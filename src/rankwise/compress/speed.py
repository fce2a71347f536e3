"""When is a factorised layer faster than the dense one, and how fast is a model: measured, not assumed.

An ``m x n`` layer applied to ``t`` tokens costs ``t m n`` multiply-adds dense and
``t k (m + n)`` factorised, so in flops the break-even rank is ``m n / (m + n)``. In wall time
the two thin products (two kernel launches, a ``t x k`` intermediate, poorer cache use) break
even at a smaller rank, ``f m n / (m + n)`` with ``f < 1``. :func:`measure_break_even`
measures ``f``: for each shape it times ``x W^T`` against ``(x D^T) U^T`` at ranks
``g m n / (m + n)`` on a grid of ``g`` and interpolates the ``g`` where their median times
cross; ``f`` is the median over shapes and token counts.

``BREAK_EVEN_FACTOR`` is that measurement on the development machine (a shared 2-core x86 CPU,
torch 2.13 CPU build, one thread, shapes 128x128 .. 1536x384, 128 and 2048 tokens):
``measure_break_even()`` gave 0.85 (per shape 0.52 .. 0.94; load average 10 from other jobs);
an earlier run of the same grid at load 1.0 put the crossings at 0.75 .. 0.98 with median 0.9
(docs/compression.md). It is the default ``keep_dense_above`` of ``compress``; measure your
own hardware (``python -c "from rankwise.compress.speed import measure_break_even as m; print(m())"``)
and pass it.

:func:`compare_latency` times several models' forwards on the same batch (median of repeats
after warm-up, no grad, eval mode), interleaved, so load changes on a shared machine hit them
alike; the break-even measurement interleaves the dense and the factorised product the same way.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

#: measured break-even factor f (see the module docstring); the default ``keep_dense_above``
BREAK_EVEN_FACTOR = 0.85

_SHAPES = ((128, 128), (384, 128), (384, 384), (1536, 384))
_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)


def interleaved_medians(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, all timed in turn round after round (after 3 warm-up rounds), so a
    load change on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(3 + repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_ >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def break_even_fraction(
    out_features: int, in_features: int, tokens: int, *, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, repeats: int = 20, seed: int = 0,
) -> float:
    """The ``g`` at which a rank ``g m n / (m + n)`` factorised layer is as fast as the dense one."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=generator).to(device=device, dtype=dtype)
    dense = nn.Linear(in_features, out_features).to(device=device, dtype=dtype)
    break_even = out_features * in_features / (out_features + in_features)
    previous = None
    for fraction in _GRID:
        rank = max(1, int(fraction * break_even))
        down = nn.Linear(in_features, rank, bias=False).to(device=device, dtype=dtype)
        up = nn.Linear(rank, out_features).to(device=device, dtype=dtype)
        times = interleaved_medians({"dense": lambda: dense(x), "factorized": lambda: up(down(x))}, repeats)
        relative = times["factorized"] / times["dense"]
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
def compare_latency(models: dict[str, nn.Module], batch: Any, *, repeats: int = 10) -> dict[str, float]:
    """Median seconds of each model's forward on ``batch`` (eval mode, no grad), the models timed in turn."""
    modes = {name: model.training for name, model in models.items()}
    try:
        for model in models.values():
            model.eval()
        return interleaved_medians({name: (lambda m=model: _run(m, batch)) for name, model in models.items()}, repeats)
    finally:
        for name, model in models.items():
            model.train(modes[name])
