"""The ``pretrain`` suite.

From a fresh random model on the embedded pretraining split (stdlib code).
"""

from __future__ import annotations

from rankwise.bench.setup import SetUp

#: the embedded corpus split it trains on, and whether set-ups start from the cached base
WORKLOAD = ("pretrain", False)

SETUPS: list[SetUp] = [
    SetUp("adamw", "full", lr=3e-3),
    SetUp("galore", "optim", "galore", lr=1e-2, rank_fraction=0.5,
          options={"update_proj_gap": 50, "scale": 0.25}),
    SetUp("low-rank W=BA", "parametrize", "lowrank", lr=3e-3, rank_fraction=0.5),
]
