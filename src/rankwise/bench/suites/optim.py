"""The ``optim`` suite.

The low-rank gradient optimizers against AdamW on the pretraining workload, each next to its
reference package (kind ``reference``: galore-torch, fira, apollo-torch, built by
:mod:`rankwise.bench.references` for the same set-up; skipped with a note when not
installed).
"""

from __future__ import annotations

from typing import Any

from rankwise.bench.setup import SetUp

#: the embedded corpus split it trains on, and whether set-ups start from the cached base
WORKLOAD = ("pretrain", False)

#: the optim suite's shared set-up: rank = half the width, refresh every 50 steps, each
#: method's own default scale (the reference rows take their counterpart's)
_OPTIM_SHARED: dict[str, Any] = {"lr": 1e-2, "rank_fraction": 0.5, "options": {"update_proj_gap": 50}}

SETUPS: list[SetUp] = [
    SetUp("adamw", "optim", "adamw", lr=3e-3),
    SetUp("galore", "optim", "galore", **_OPTIM_SHARED),
    SetUp("galore-torch GaLoreAdamW", "reference", "galore-torch", **_OPTIM_SHARED),
    SetUp("galore8bit", "optim", "galore8bit", **_OPTIM_SHARED),
    SetUp("qgalore", "optim", "qgalore", **_OPTIM_SHARED),
    SetUp("fira", "optim", "fira", **_OPTIM_SHARED),
    SetUp("fira FiraAdamW", "reference", "fira", **_OPTIM_SHARED),
    SetUp("apollo", "optim", "apollo", **_OPTIM_SHARED),
    SetUp("apollo-torch APOLLOAdamW", "reference", "apollo-torch", **_OPTIM_SHARED),
    SetUp("apollo_mini", "optim", "apollo_mini", lr=1e-2, options={"update_proj_gap": 50}),
    SetUp("dct", "optim", "dct", **_OPTIM_SHARED),
    SetUp("frugal", "optim", "frugal", lr=1e-2, options={"update_proj_gap": 50}),  # its blocks: density, no rank
    SetUp("gradnorm_lorp", "optim", "gradnorm_lorp", **_OPTIM_SHARED),
    SetUp("ldadam", "optim", "ldadam", **_OPTIM_SHARED),
]
