"""Shared numerical building blocks, written once and reused by every pillar."""

from rankwise.linalg.svd import (
    SVDFailure,
    captured_energy,
    orthonormal_basis,
    randomized_svd,
    svd,
    truncated_svd,
    warm_svd,
)

__all__ = [
    "SVDFailure", "captured_energy", "orthonormal_basis", "randomized_svd", "svd", "truncated_svd", "warm_svd",
]
