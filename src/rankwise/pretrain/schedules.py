"""Learning-rate schedules of the parametrisations that restart part of their state.

:func:`jagged_cosine_schedule` is ReLoRA's "jagged cosine" (Lialin et al., "ReLoRA:
High-Rank Training Through Low-Rank Updates", arXiv 2307.05695, Sec. 3): one cosine decay
over the whole run, with the learning rate dropped to zero at every restart and warmed back
up linearly to the envelope over a few steps, because the freshly reset optimizer state and
factors would otherwise take full-size steps at once. Multiplier used by training step
``s + 1`` (the LambdaLR convention of :func:`rankwise.training.cosine_schedule`)::

    envelope(s) = m + (1 - m) (1 + cos(pi min(1, (s - w) / max(1, S - w)))) / 2
    s <  w:                   (s + 1) / w                         first warm-up
    t = s - last restart < v: envelope(restart + v) (t + 1) / v   re-warm-up after a restart
    otherwise:                envelope(s)

with ``w`` the first warm-up, ``v`` the restart warm-up, ``S`` the total steps, ``m`` the
floor and restarts after steps ``k, 2k, ...`` (``restarts_from`` + multiples of ``k``).
Deviation from the release: it multiplies by ``t / v``, so the step right after a restart
has learning rate 0 (a wasted step); this one uses ``(t + 1) / v``, like rankwise's first
warm-up.
"""

from __future__ import annotations

import math

import torch

from rankwise.errors import RankwiseError


def restart_steps(total_steps: int, restart_every: int | None, restarts_from: int = 0) -> list[int]:
    """The steps after which a restart happens: ``restarts_from + k, restarts_from + 2k, ... < total_steps``."""
    if restart_every is None:
        return []
    return list(range(restarts_from + restart_every, total_steps, restart_every))


def jagged_cosine_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    restart_every: int | None,
    restart_warmup_steps: int,
    restarts_from: int = 0,
    min_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """ReLoRA's jagged cosine schedule (formula in the module docstring).

    ``restarts_from`` shifts the restarts (ReLoRA's full-rank warm start ends there, and that
    switch is a restart too when it is > 0). ``restart_every=None`` gives the plain cosine.
    """
    for name, value in (("total_steps", total_steps), ("restart_warmup_steps", restart_warmup_steps)):
        if not isinstance(value, int) or value < (1 if name == "total_steps" else 0):
            raise RankwiseError(f"{name} must be a {'positive' if name == 'total_steps' else 'non-negative'} "
                                f"integer, got {value!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise RankwiseError(f"warmup_steps must be an integer in [0, total_steps={total_steps}], got {warmup_steps!r}")
    if restart_every is not None and (not isinstance(restart_every, int) or restart_every < 1):
        raise RankwiseError(f"restart_every must be a positive integer or None, got {restart_every!r}")
    if not 0.0 <= min_ratio <= 1.0:
        raise RankwiseError(f"min_ratio must be in [0, 1], got {min_ratio}")
    restarts = ([restarts_from] if restarts_from > 0 else []) + restart_steps(total_steps, restart_every, restarts_from)

    def envelope(step: int) -> float:
        progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        last = max((r for r in restarts if r <= step), default=None)
        if last is not None and restart_warmup_steps and step - last < restart_warmup_steps:
            return envelope(last + restart_warmup_steps) * (step - last + 1) / restart_warmup_steps
        return envelope(step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
