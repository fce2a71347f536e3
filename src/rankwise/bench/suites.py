"""The benchmark suites: tables of set-ups trained side by side on the same data and seed.

A set-up names one way to train (a pillar and a registered method with its options). Adding
a method to the benchmark is one row here. ``default=False`` rows run only with
``--preset full`` or when asked for by name (``--setups``), so the default run stays short.

Suites:
- ``pretrain``: from a fresh random model on the embedded pretraining split (stdlib code).
- ``finetune``: from the cached base checkpoint on the shifted split (documentation prose).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rankwise.errors import RankwiseError

#: how a set-up changes the model / optimizer
KINDS = ("full", "optim", "adapter", "parametrize")


@dataclass(frozen=True)
class SetUp:
    """One row of a suite.

    kind ``full``: AdamW on every parameter. ``optim``: ``rankwise.optim.build(name=method)``
    on every parameter. ``adapter``: ``rankwise.adapt(method)`` then AdamW on the adapter.
    ``parametrize``: ``rankwise.pretrain.parametrize(method)`` then AdamW.
    ``rank`` is in model-width units: ``rank_fraction`` of the hidden size when ``rank`` is None.
    """

    name: str
    kind: str
    method: str = "adamw"
    lr: float = 1e-3
    rank: int | None = None
    rank_fraction: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    default: bool = True

    def resolved_rank(self, hidden_size: int) -> int | None:
        if self.rank is not None:
            return self.rank
        if self.rank_fraction is not None:
            return max(1, int(round(self.rank_fraction * hidden_size)))
        return None


SUITES: dict[str, list[SetUp]] = {
    "pretrain": [
        SetUp("adamw", "full", lr=3e-3),
        SetUp("galore", "optim", "galore", lr=1e-2, rank_fraction=0.5,
              options={"update_proj_gap": 50, "scale": 0.25}),
        SetUp("low-rank W=BA", "parametrize", "lowrank", lr=3e-3, rank_fraction=0.5),
    ],
    "finetune": [
        SetUp("full fine-tuning", "full", lr=3e-4),
        SetUp("lora", "adapter", "lora", lr=3e-3, rank=8),
    ],
}


def select_setups(suite: str, names: list[str] | None, include_all: bool) -> list[SetUp]:
    """The set-ups of ``suite`` to run: those named, else the default ones (or all)."""
    if suite not in SUITES:
        raise RankwiseError(f"unknown suite {suite!r}; known: {', '.join(sorted(SUITES))}")
    table = SUITES[suite]
    if names:
        known = {s.name: s for s in table}
        missing = [n for n in names if n not in known]
        if missing:
            raise RankwiseError(f"suite {suite!r} has no set-up {missing}; it has: {', '.join(known)}")
        return [known[n] for n in names]
    return [s for s in table if include_all or s.default]
