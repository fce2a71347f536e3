"""Common-suite rows of APOLLO, APOLLO-Mini and the DCT optimizer (state bytes of fp32 weights).

APOLLO keeps Adam moments of the projected shape (``r x max(m, n)`` under ``std``) and one
float32 limiter norm; the random projection is a stored integer (0 bytes), the svd variant
adds its ``min(m, n) x r`` basis. The DCT optimizer keeps the moments and ``r`` int32 indices
per weight, plus (matmul backend) one shared ``s x s`` DCT matrix per distinct projected size ``s``,
plus (error feedback) an ``m x n`` buffer.
"""

from __future__ import annotations

from typing import Sequence

from cases.optimizer_case import FP32, OptimizerCase

INT32 = 4


def apollo_weight_bytes(m: int, n: int, rank: int, *, svd: bool = False) -> int:
    basis = rank * min(m, n) if svd else 0
    return (2 * rank * max(m, n) + basis) * FP32 + FP32


def dct_weight_bytes(m: int, n: int, rank: int) -> int:
    return 2 * rank * max(m, n) * FP32 + rank * INT32


def dct_shared_bytes(shapes: Sequence[tuple[int, int]]) -> int:
    """One fp32 DCT matrix per distinct shorter side (``std`` projects onto the shorter side)."""
    return sum(size * size * FP32 for size in {min(shape) for shape in shapes})


CASES = [
    OptimizerCase("apollo", {"rank": 4, "update_proj_gap": 2}, lambda m, n: apollo_weight_bytes(m, n, 4)),
    OptimizerCase(
        "apollo",
        {"rank": 4, "update_proj_gap": 2, "proj": "svd", "scale_type": "tensor"},
        lambda m, n: apollo_weight_bytes(m, n, 4, svd=True),
    ),
    OptimizerCase(
        "apollo",
        {"rank": 4, "update_proj_gap": 2, "moment_policy": "rotate", "scale": 2.0},
        lambda m, n: apollo_weight_bytes(m, n, 4),
    ),
    OptimizerCase("apollo_mini", {"update_proj_gap": 2}, lambda m, n: apollo_weight_bytes(m, n, 1)),
    OptimizerCase(
        "dct", {"rank": 8, "update_proj_gap": 2}, lambda m, n: dct_weight_bytes(m, n, 8), shared_bytes=dct_shared_bytes
    ),
    OptimizerCase(  # the fft backend stores no DCT matrix
        "dct",
        {"rank": 4, "update_proj_gap": 2, "moment_policy": "reset", "dct_backend": "fft"},
        lambda m, n: dct_weight_bytes(m, n, 4),
    ),
    OptimizerCase(  # error feedback adds a full m x n buffer
        "dct",
        {"rank": 4, "update_proj_gap": 2, "dct_backend": "fft", "error_feedback": True},
        lambda m, n: dct_weight_bytes(m, n, 4) + m * n * FP32,
    ),
]
