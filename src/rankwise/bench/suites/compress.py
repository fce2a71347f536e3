"""The ``compress`` suite.

From the cached base on the pretraining split: the base compressed at a ratio then trained
on (the recovery a compressed model gets), against the dense base trained the same way.
"""

from __future__ import annotations

from rankwise.bench.setup import SetUp

#: the embedded corpus split it trains on, and whether set-ups start from the cached base
WORKLOAD = ("pretrain", True)

# The base compressed then trained on the split it was pretrained on, next to the dense
# base trained the same way: what recovery training buys back at each ratio.
SETUPS: list[SetUp] = [
    SetUp("dense base", "full", lr=3e-4),
    SetUp("svd 80%", "compress", "svd", lr=3e-4, ratio=0.8),
    SetUp("svd 50%", "compress", "svd", lr=3e-4, ratio=0.5),
]
