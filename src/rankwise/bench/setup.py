"""One row of a benchmark suite: a set-up (a pillar, a registered method and its options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepFraction:
    """An option given as a fraction of the run's steps (schedules such as AdaLoRA's tinit),
    so a suite row stays valid whatever ``--steps`` is."""

    fraction: float

    def resolve(self, steps: int) -> int:
        return int(round(self.fraction * steps))


@dataclass(frozen=True)
class SetUp:
    """One row of a suite.

    kind ``full``: AdamW on every parameter. ``optim``: ``rankwise.optim.build(name=method)``
    on every parameter. ``adapter``: ``rankwise.adapt(method)`` then AdamW on the adapter (or the optimizer the
    method names, or ``rankwise.optim.build(optimizer)`` with ``optimizer_options``).
    ``parametrize``: ``rankwise.pretrain.parametrize(method)`` then AdamW.
    ``reference``: a reference package's optimizer (``method`` names it in
    ``rankwise.bench.references.REFERENCES``) on the split ``optim`` uses.
    ``compress``: ``rankwise.compress(method, ratio=ratio)`` then AdamW on every parameter.
    ``compress_lrc``: the same compression, then AdamW on the low-rank components only (WeLore).
    ``rank`` is in model-width units: ``rank_fraction`` of the hidden size when ``rank`` is None.
    (``rankwise.bench.kinds.KINDS`` maps each kind to what it does.)
    """

    name: str
    kind: str
    method: str = "adamw"
    lr: float = 1e-3
    rank: int | None = None
    rank_fraction: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    default: bool = True
    #: extra ``rankwise.optim.build`` arguments for adapter set-ups (LoRA+'s ``loraplus_lr_ratio``)
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    #: the ``rankwise.optim`` optimizer of adapter / parametrize / compress set-ups (None: the
    #: method's own, else AdamW)
    optimizer: str | None = None
    #: compress set-ups: the fraction of the targeted layers' weights kept
    ratio: float | None = None

    def resolved_options(self, steps: int) -> dict[str, Any]:
        return {k: v.resolve(steps) if isinstance(v, StepFraction) else v for k, v in self.options.items()}

    def resolved_rank(self, hidden_size: int) -> int | None:
        if self.rank is not None:
            return self.rank
        if self.rank_fraction is not None:
            return max(1, int(round(self.rank_fraction * hidden_size)))
        return None
