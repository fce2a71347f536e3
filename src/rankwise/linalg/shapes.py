"""Integer factorisations of tensor dimensions (for tensorising a matrix into sites)."""

from __future__ import annotations


def prime_factors(n: int) -> tuple[int, ...]:
    """The prime factors of ``n >= 1``, ascending, with multiplicity (``()`` for 1)."""
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return tuple(factors)
