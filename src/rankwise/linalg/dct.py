"""The orthonormal DCT-II basis: the matrix, some of its columns, or the transform by Makhoul's FFT.

For size ``N`` the DCT-II basis matrix ``Q`` (``N x N``) has the basis vectors as columns::

    Q[i, k] = c_k cos(pi (2 i + 1) k / (2 N)),   c_0 = sqrt(1 / N),  c_k = sqrt(2 / N) (k >= 1)

so ``Q^T Q = I`` and ``X Q`` is the orthonormal DCT-II of every row of ``X``.
:func:`dct_rows` computes the same product in ``O(N log N)`` per row with Makhoul's
algorithm (J. Makhoul, "A fast cosine transform in one and two dimensions", IEEE TASSP
1980): reorder ``v = (x_0, x_2, x_4, ..., x_5, x_3, x_1)``, take ``V = FFT(v)``, then
``X_k = c_k Re(exp(-i pi k / (2 N)) V_k)``.
"""

from __future__ import annotations

import math

import torch


def dct_matrix(size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """``Q`` (``size x size``) whose columns are the orthonormal DCT-II basis vectors."""
    if size < 1:
        raise ValueError(f"DCT size must be >= 1, got {size}")
    return dct_columns(size, torch.arange(size, device=device), dtype=dtype)


def dct_columns(size: int, indices: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Q[:, indices]`` without building ``Q`` (``O(size * len(indices))``), on ``indices.device``.

    The phase ``(2 i + 1) k`` is reduced modulo ``4 size`` in integer arithmetic and the cosine
    taken in float64, so every entry is accurate to the working precision for any ``size``;
    the result is cast to ``dtype``.
    """
    position = torch.arange(size, dtype=torch.int64, device=indices.device).unsqueeze(1)
    frequency = indices.to(torch.int64).unsqueeze(0)
    phase = torch.remainder((2 * position + 1) * frequency, 4 * size).to(torch.float64)
    columns = torch.cos(phase * (math.pi / (2.0 * size))) * math.sqrt(2.0 / size)
    columns = torch.where(frequency == 0, columns / math.sqrt(2.0), columns)
    return columns.to(dtype)


def dct_rows(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix @ dct_matrix(n)`` for an ``m x n`` matrix, by Makhoul's FFT algorithm.

    Computed in float32 (float64 for float64 input) and returned in ``matrix.dtype``.
    """
    work = matrix.to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    n = work.shape[-1]
    reordered = torch.cat([work[..., 0::2], work[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(reordered, dim=-1)
    frequency = torch.arange(n, dtype=work.dtype, device=work.device)
    twiddle = torch.polar(torch.ones_like(frequency), -math.pi * frequency / (2.0 * n))
    result = (spectrum * twiddle).real * math.sqrt(2.0 / n)
    result[..., 0] /= math.sqrt(2.0)
    return result.to(matrix.dtype)
