"""Shared numerical building blocks, written once and reused by every pillar."""

from rankwise.linalg.svd import SVDFailure, orthonormal_basis, randomized_svd, svd, truncated_svd

__all__ = ["SVDFailure", "orthonormal_basis", "randomized_svd", "svd", "truncated_svd"]
