"""Seeded random projections from a d-dimensional subspace into D parameters: Fastfood and very sparse.

Training in a random subspace (Li, Farkhoor, Liu & Yosinski 2018, "Measuring the Intrinsic
Dimension of Objective Landscapes", arXiv 1804.08838; Aghajanyan, Zettlemoyer & Gupta 2021,
arXiv 2012.13255) moves the parameters only along ``theta0 + P z`` with a fixed random
``D x d`` matrix ``P``. Neither projection here is stored: both are regenerated from a seed,
so a model file holds ``z`` and the seed.

- :class:`FastfoodProjection` (Le, Sarlos & Smola 2013, "Fastfood: Approximating Kernel
  Expansions in Loglinear Time"): ``z`` is zero-padded to ``d' = 2^ceil(log2 d)`` and each
  block of ``d'`` outputs is ``H G Pi H B z / (sqrt(d') ||g||)`` with ``H`` the (unnormalised,
  Sylvester) Walsh-Hadamard matrix, ``B`` a random +-1 diagonal, ``Pi`` a random permutation and
  ``G = diag(g)``, ``g`` standard normal; ``ceil(D / d')`` independent blocks are stacked and cut
  to ``D`` rows. Every column of a block has unit norm, so the entries have variance ``1/d'``
  (those of a Gaussian ``N(0, 1/d')`` matrix, which Fastfood emulates at ``O(D log d)`` cost and
  ``3 D`` stored numbers). The chi-distributed row scaling ``S`` of the kernel version is left
  out (it matters for kernel approximation, not for spanning a random subspace).
- :class:`SparseProjection` (Li, Hastie & Church 2006, "Very Sparse Random Projections"): entries
  ``+-sqrt(s / d)`` with probability ``1 / (2 s)`` each and 0 otherwise, ``s = sqrt(D)``, so they
  also have variance ``1/d``; about ``d sqrt(D)`` non-zeros, their positions drawn per column
  (with replacement; a repeated position adds up).

Both map a length-``d`` vector to ``D`` outputs, are linear (gradients flow to ``z``) and are
drawn on the CPU from ``torch.Generator().manual_seed(seed)``, then moved, so they are
bit-identical across runs and machines for a given seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn


#: up to this length one matmul with H beats log2(n) butterfly passes (each a copy of x)
DENSE_HADAMARD_MAX = 64


def sylvester_hadamard(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` along the last dimension (a power of 2) with ``H`` the unnormalised Sylvester
    Hadamard matrix (:func:`sylvester_hadamard`; symmetric): one matmul for short lengths, else
    ``O(n log n)`` butterflies."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    if n <= DENSE_HADAMARD_MAX:
        return x @ sylvester_hadamard(n, dtype=x.dtype, device=x.device)
    lead = x.shape[:-1]
    half = 1
    while half < n:
        pairs = x.reshape(*lead, n // (2 * half), 2, half)
        first, second = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((first + second, first - second), dim=-2).reshape(*lead, n)
        half *= 2
    return x


class FastfoodProjection(nn.Module):
    """``z (d) -> P z (D)`` with ``P`` a stack of seeded Fastfood blocks (see the module docstring).

    Its tensors are non-persistent buffers: they follow ``.to()`` but are never saved."""

    def __init__(self, rows: int, dimension: int, seed: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.rows, self.dimension = rows, dimension
        self.width = 1 << max(0, math.ceil(math.log2(dimension)))
        blocks = -(-rows // self.width)
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (blocks, self.width), generator=generator) * 2 - 1
        permutation = torch.argsort(torch.rand(blocks, self.width, generator=generator), dim=1)
        gaussian = torch.randn(blocks, self.width, generator=generator, dtype=torch.float64)
        norm = gaussian.norm(dim=1, keepdim=True) * math.sqrt(self.width)
        self.register_buffer("signs", signs.to(dtype=dtype, device=device), persistent=False)
        self.register_buffer("permutation", permutation.to(device), persistent=False)
        # G / (sqrt(d') ||g||): the block's normalisation folded into its Gaussian diagonal
        self.register_buffer("gaussian", (gaussian / norm).to(dtype=dtype, device=device), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(z, (0, self.width - self.dimension))
        x = hadamard_transform(self.signs * padded)
        x = torch.gather(x, 1, self.permutation) * self.gaussian
        return hadamard_transform(x).flatten()[: self.rows]

    def dense(self) -> torch.Tensor:
        """``P`` itself (``D x d``), for tests and small layers."""
        return torch.stack([self(e) for e in torch.eye(self.dimension, dtype=self.signs.dtype,
                                                         device=self.signs.device)], dim=1)


class SparseProjection(nn.Module):
    """``z (d) -> P z (D)`` with ``P`` very sparse: ``+-sqrt(s / d)`` w.p. ``1/(2s)`` each, ``s = sqrt(D)``.

    Its tensors are non-persistent buffers: they follow ``.to()`` but are never saved."""

    def __init__(self, rows: int, dimension: int, seed: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.rows, self.dimension = rows, dimension
        sparsity = math.sqrt(rows)
        generator = torch.Generator().manual_seed(seed)
        counts = torch.binomial(torch.full((dimension,), float(rows), dtype=torch.float64),
                                torch.full((dimension,), 1.0 / sparsity, dtype=torch.float64), generator=generator)
        counts = counts.long()
        total = int(counts.sum())
        row_index = torch.randint(0, rows, (total,), generator=generator)
        signs = torch.randint(0, 2, (total,), generator=generator) * 2 - 1
        self.register_buffer("row_index", row_index.to(device), persistent=False)
        self.register_buffer("column_index", torch.repeat_interleave(torch.arange(dimension), counts).to(device),
                             persistent=False)
        self.register_buffer("values", (signs * math.sqrt(sparsity / dimension)).to(dtype=dtype, device=device),
                             persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(self.rows).index_add(0, self.row_index, self.values * z[self.column_index])

    def dense(self) -> torch.Tensor:
        """``P`` itself (``D x d``), for tests and small layers."""
        matrix = self.values.new_zeros(self.rows, self.dimension)
        return matrix.index_put_((self.row_index, self.column_index), self.values, accumulate=True)


PROJECTIONS = {"fastfood": FastfoodProjection, "sparse": SparseProjection}
