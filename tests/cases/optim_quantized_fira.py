"""Common-suite rows of galore8bit, qgalore and fira, with their exact state-byte formulas.

``accumulation_tolerance`` of the quantised rows (tests/test_optim_layerwise.py: accumulated
micro-batches against one full batch, whose gradients differ in float summation order only):
a summation-order difference can flip a quantisation bin. Measured (share of the distance
moved in 3 steps, worst parameter): galore8bit 4e-4 / 0, qgalore 0.009 (its INT4 projector
codes flip), with INT8 weights 0.052 (the weights' own rounding). Dropping the weight decay
moves these rows 1.8% (0.05% for the INT8 row, below its rounding: the exact comparisons of
the layerwise and distributed tests catch that).
"""

from __future__ import annotations

import math

from cases.optimizer_case import FP32, OptimizerCase, adam_bytes, galore_weight_bytes

BLOCK = 256  # absmax block of the 8-bit moments


def moments_8bit_bytes(numel: int, min_8bit_size: int = 4096) -> int:
    """Two Adam moments of ``numel`` numbers: uint8 codes + one fp32 absmax per block of 256
    each, or two fp32 moments below ``min_8bit_size``."""
    if numel < min_8bit_size:
        return adam_bytes(numel)
    return 2 * (numel + FP32 * math.ceil(numel / BLOCK))


def galore8bit_weight_bytes(m: int, n: int, rank: int, min_8bit_size: int = 4096) -> int:
    """std projection: 8-bit moments of r x max(m, n), fp32 basis min(m, n) x r."""
    return moments_8bit_bytes(rank * max(m, n), min_8bit_size) + FP32 * rank * min(m, n)


def qgalore_weight_bytes(
    m: int,
    n: int,
    rank: int,
    *,
    min_8bit_size: int = 4096,
    group: int = 256,
    queue: int = 5,
    weight_group: int | None = None,
) -> int:
    """8-bit moments + INT4 basis (two codes a byte, fp32 min and step per group) + the
    cosine window (fp32 x queue); with INT8 weights also one byte per weight + fp32 min and
    step per weight group."""
    basis = rank * min(m, n)
    total = moments_8bit_bytes(rank * max(m, n), min_8bit_size)
    total += math.ceil(basis / 2) + 2 * FP32 * math.ceil(basis / group) + FP32 * queue
    if weight_group is not None:
        total += m * n + 2 * FP32 * math.ceil(m * n / weight_group)
    return total


CASES = [
    OptimizerCase(
        "galore8bit",
        {"rank": 8, "update_proj_gap": 2, "min_8bit_size": 0},
        lambda m, n: galore8bit_weight_bytes(m, n, 8, 0),
        lambda numel: moments_8bit_bytes(numel, 0),
        accumulation_tolerance=2e-3,
    ),
    OptimizerCase(
        "galore8bit",
        {"rank": 4, "update_proj_gap": 2, "moment_policy": "rotate"},
        lambda m, n: galore8bit_weight_bytes(m, n, 4),  # below 4096 numbers: fp32 moments
        moments_8bit_bytes,  # embed_tokens and lm_head (4096 numbers) are 8-bit, norms fp32
        accumulation_tolerance=2e-3,
    ),
    OptimizerCase(
        "qgalore",
        {"rank": 8, "update_proj_gap": 2, "min_8bit_size": 0},
        lambda m, n: qgalore_weight_bytes(m, n, 8, min_8bit_size=0),
        lambda numel: moments_8bit_bytes(numel, 0),
        accumulation_tolerance=0.014,
    ),
    OptimizerCase(
        "qgalore",
        {
            "rank": 4,
            "update_proj_gap": 2,
            "min_8bit_size": 0,
            "quant_group_size": 64,
            "queue_size": 3,
            "weight_quant": True,
        },
        lambda m, n: qgalore_weight_bytes(m, n, 4, min_8bit_size=0, group=64, queue=3, weight_group=256),
        lambda numel: moments_8bit_bytes(numel, 0),
        accumulation_tolerance=0.08,
    ),
    OptimizerCase("fira", {"rank": 8, "update_proj_gap": 2}, lambda m, n: galore_weight_bytes(m, n, 8) + FP32),
    OptimizerCase(
        "fira",
        {"rank": 4, "update_proj_gap": 2, "scale": 0.5, "moment_policy": "reset"},
        lambda m, n: galore_weight_bytes(m, n, 4) + FP32,  # + the limiter's previous residual norm
    ),
]
