"""Common-suite rows of FRUGAL, LDAdam and GradNormLoRP, with their exact state-byte formulas (fp32 weights).

FRUGAL keeps Adam moments on the state-full part only: ``r = round(rho * side)`` columns or
rows (+ the stored basis for ``svd``; ``random`` stores a seed), ``round(rho m n)`` entries
for ``coordinates`` (indices regenerated from a seed), or a whole weight for a state-full
block (nothing for a state-free one). LDAdam keeps GaLore's moments and basis plus, with
error feedback, the ``m x n`` error. GradNormLoRP keeps GaLore's state for the direction plus
four numbers per row: the magnitude, the direction's norm and the magnitude's two moments.

FRUGAL's signSGD on the state-free part is discontinuous in the gradient: accumulated
micro-batches and one full batch (gradients equal up to float summation order) may flip a
sign. Measured: at most 1e-4 of the distance moved in 3 steps; a lost weight decay moves the
rows 1.8-10.6%; ``accumulation_tolerance`` is 1e-3.
"""

from __future__ import annotations

from cases.optimizer_case import FP32, OptimizerCase, galore_weight_bytes

DENSITY = 0.25


def frugal_rank(m: int, n: int, density: float = DENSITY) -> int:
    """std orientation: the shorter side is kept, r = round(rho * min(m, n))."""
    return round(density * min(m, n))


def frugal_random_bytes(m: int, n: int) -> int:
    return 2 * frugal_rank(m, n) * max(m, n) * FP32


def frugal_coordinate_bytes(m: int, n: int) -> int:
    return 2 * round(DENSITY * m * n) * FP32


DOWN_PROJ = (32, 64)
BLOCK_SEED = 38  # the first random choice of 2 among the 14 all-linear weights is both down_proj


def frugal_random_block_bytes(m: int, n: int) -> int:
    """14 projected weights, density 0.15: round(2.1) = 2 state-full weights; with seed 38 the
    first random choice is the two down_proj weights (checked in test_optim_frugal.py), the
    only 32 x 64 weights of the fixture, which alone hold moments after one step."""
    return 2 * m * n * FP32 if (m, n) == DOWN_PROJ else 0


def ldadam_bytes(m: int, n: int, rank: int, *, error_feedback: bool = True) -> int:
    return galore_weight_bytes(m, n, rank) + (m * n * FP32 if error_feedback else 0)


def gradnorm_bytes(m: int, n: int, rank: int) -> int:
    return galore_weight_bytes(m, n, rank) + 4 * m * FP32


CASES = [
    OptimizerCase(
        "frugal",
        {"proj": "svd", "update_proj_gap": 2},
        lambda m, n: galore_weight_bytes(m, n, frugal_rank(m, n)),
        accumulation_tolerance=1e-3,
    ),
    OptimizerCase(
        "frugal",
        {"proj": "random", "update_proj_gap": 2, "moment_policy": "rotate", "state_free": "sgd"},
        frugal_random_bytes,
        accumulation_tolerance=1e-3,
    ),
    OptimizerCase(
        "frugal",
        {"proj": "coordinates", "update_proj_gap": 2, "moment_policy": "rotate"},
        frugal_coordinate_bytes,
        accumulation_tolerance=1e-3,
    ),
    OptimizerCase(
        "frugal",
        {"proj": "blocks", "update_proj_gap": 2, "density": 0.15, "seed": BLOCK_SEED},
        frugal_random_block_bytes,
        accumulation_tolerance=1e-3,
    ),
    OptimizerCase("ldadam", {"rank": 4}, lambda m, n: ldadam_bytes(m, n, 4)),
    OptimizerCase(
        "ldadam",
        {"rank": 4, "error_feedback": False, "update_proj_gap": 2, "moment_policy": "reset", "eps": 1e-6},
        lambda m, n: ldadam_bytes(m, n, 4, error_feedback=False),
    ),
    OptimizerCase("gradnorm_lorp", {"rank": 4, "update_proj_gap": 2}, lambda m, n: gradnorm_bytes(m, n, 4)),
    OptimizerCase(
        "gradnorm_lorp",
        {"rank": 8, "update_proj_gap": 2, "moment_policy": "rotate", "scale": 1.0, "weight_decay": 0.01},
        lambda m, n: gradnorm_bytes(m, n, 8),
    ),
]
