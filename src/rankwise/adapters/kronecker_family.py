"""What the Kronecker-product adapters (LoKr, Compacter) share: applying ``A (x) B`` without forming it,
and splitting a dimension into two factors.

For ``A`` (``p x q``) and ``B`` (``m x n``), ``(A (x) B)[(i, k), (j, l)] = A[i, j] B[k, l]`` with
C-order multi-indices (the first factor most significant). Then for an input row ``x`` of length
``q n`` read as the ``q x n`` matrix ``X`` (``x.reshape(q, n)``)::

    (A (x) B) x  =  vec(A X B^T)           (Van Loan, "The ubiquitous Kronecker product", 2000)

which costs ``p q n + p n m`` per row instead of ``p q m n`` (:func:`kron_apply`).
"""

from __future__ import annotations

import math

import torch


def kron_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x (left (x) right)^T`` over the last dimension of ``x``, never forming the Kronecker product."""
    p, q = left.shape
    m, n = right.shape
    rows = x.reshape(*x.shape[:-1], q, n)
    return (left @ rows @ right.T).reshape(*x.shape[:-1], p * m)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m n = dimension``: ``(factor, dimension / factor)`` when ``factor`` divides it,
    else ``m`` the largest divisor ``<= sqrt(dimension)`` (and ``<= factor`` when one is given) and
    ``m <= n`` -- the split LyCORIS / PEFT's LoKr use."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = math.isqrt(dimension) if factor <= 0 else min(math.isqrt(dimension), factor)
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m
