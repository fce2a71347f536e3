"""Known answers of the rank, energy-rank and norm diagnostics on constructed matrices."""

import math

import torch

from cases.row_types import DiagnosticCase

RANKME_EPS = 1e-7  # RankMe's epsilon, written out here so the rows do not read the code under test


def rankme(singular_values: list[float]) -> float:
    """RankMe's formula in plain Python floats: p = s / sum(s) + 1e-7, exp(-sum p log p)."""
    total = sum(singular_values)
    p = [s / total + RANKME_EPS for s in singular_values]
    return math.exp(-sum(q * math.log(q) for q in p))


def with_spectrum(values: list[float], out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """``Q1 diag(values) Q2^T`` in float64 with random orthonormal Q1, Q2 (rank len(values))."""
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(out_features, len(values), generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(in_features, len(values), generator=gen, dtype=torch.float64))
    return q1 @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q2.T


def rank_one() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(12, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, 7, generator=gen, dtype=torch.float64)


SPREAD = [9.0, 5.0, 2.0, 0.5]  # a 10 x 6 matrix of rank 4 with these singular values

CASES = [
    # effective rank: the formula's value, exact in float64 (n equal values give n up to O(n eps);
    # rank 1 gives 1 + ~1e-5: each of the six zero values adds -1e-7 log 1e-7 to the entropy)
    DiagnosticCase("effective_rank/identity-16", "effective_rank", lambda: torch.eye(16, dtype=torch.float64),
                   rankme([1.0] * 16), rel=1e-9),
    DiagnosticCase("effective_rank/rank-one", "effective_rank", rank_one, rankme([1.0] + [0.0] * 6), rel=1e-9),
    DiagnosticCase("effective_rank/diag-3-4", "effective_rank", lambda: torch.diag(torch.tensor([3.0, 4.0])),
                   rankme([4.0, 3.0]), rel=1e-7),
    DiagnosticCase("effective_rank/spread", "effective_rank", lambda: with_spectrum(SPREAD, 10, 6),
                   rankme(SPREAD + [0.0, 0.0]), rel=1e-9),
    # stable rank: sum s^2 / s_1^2
    DiagnosticCase("stable_rank/identity-16", "stable_rank", lambda: torch.eye(16, dtype=torch.float64), 16.0),
    DiagnosticCase("stable_rank/rank-one", "stable_rank", rank_one, 1.0),
    DiagnosticCase("stable_rank/diag-3-4", "stable_rank", lambda: torch.diag(torch.tensor([3.0, 4.0])), 25 / 16,
                   rel=1e-7),
    DiagnosticCase("stable_rank/spread", "stable_rank", lambda: with_spectrum(SPREAD, 10, 6),
                   sum(s * s for s in SPREAD) / 81.0),
    # norms: sigma_1 and sqrt(sum sigma^2)
    DiagnosticCase("spectral_norm/diag-3-4", "spectral_norm", lambda: torch.diag(torch.tensor([3.0, 4.0])), 4.0,
                   rel=1e-7),
    DiagnosticCase("spectral_norm/spread", "spectral_norm", lambda: with_spectrum(SPREAD, 10, 6), 9.0),
    DiagnosticCase("frobenius_norm/diag-3-4", "frobenius_norm", lambda: torch.diag(torch.tensor([3.0, 4.0])), 5.0,
                   rel=1e-7),
    DiagnosticCase("frobenius_norm/spread", "frobenius_norm", lambda: with_spectrum(SPREAD, 10, 6),
                   math.sqrt(sum(s * s for s in SPREAD))),
    # nuclear norm: sum sigma
    DiagnosticCase("nuclear_norm/diag-3-4", "nuclear_norm", lambda: torch.diag(torch.tensor([3.0, 4.0])), 7.0,
                   rel=1e-7),
    DiagnosticCase("nuclear_norm/identity-16", "nuclear_norm", lambda: torch.eye(16, dtype=torch.float64), 16.0),
    DiagnosticCase("nuclear_norm/spread", "nuclear_norm", lambda: with_spectrum(SPREAD, 10, 6), sum(SPREAD)),
    # energy rank: smallest k with s_1^2 + ... + s_k^2 >= share * sum s^2 (SPREAD: 81, 106, 110, 110.25 of 110.25)
    DiagnosticCase("energy_rank/spread-0.9", "energy_rank", lambda: with_spectrum(SPREAD, 10, 6), 2.0),
    DiagnosticCase("energy_rank/spread-0.5", "energy_rank", lambda: with_spectrum(SPREAD, 10, 6), 1.0,
                   options={"share": 0.5}),
    DiagnosticCase("energy_rank/spread-0.99", "energy_rank", lambda: with_spectrum(SPREAD, 10, 6), 3.0,
                   options={"share": 0.99}),
    DiagnosticCase("energy_rank/spread-all", "energy_rank", lambda: with_spectrum(SPREAD, 10, 6), 4.0,
                   options={"share": 1.0}),
    DiagnosticCase("energy_rank/identity-16", "energy_rank", lambda: torch.eye(16, dtype=torch.float64), 15.0),
    DiagnosticCase("energy_rank/rank-one", "energy_rank", rank_one, 1.0, options={"share": 1.0}),
]
