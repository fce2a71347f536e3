"""Matrix product states (tensor trains): Schmidt values at every bond, from a dense tensor or from cores.

The format is the standard tensor train (Oseledets, "Tensor-Train Decomposition", SIAM J.
Sci. Comput. 33(5), 2011): a tensor ``T[i_1, ..., i_N]`` is the product of cores ``G_k`` of
shape ``(r_{k-1}, d_k, r_k)`` with ``r_0 = r_N = 1``::

    T[i_1, ..., i_N] = G_1[:, i_1, :] G_2[:, i_2, :] ... G_N[:, i_N, :]

Operator cores ``(r_{k-1}, m_k, n_k, r_k)`` (an ``out x in`` matrix with ``out = prod m_k``,
``in = prod n_k``) are the same thing with site ``k`` carrying the pair ``(i_k, j_k)``, row
index major: the matrix entry is ``W[(i_1..i_N), (j_1..j_N)]`` with both multi-indices in C
order (the first factor most significant), exactly what ``W.reshape(m_1..m_N, n_1..n_N)``
addresses.

The Schmidt values at bond ``k`` (the cut between sites ``k`` and ``k+1``) are the singular
values of the tensor reshaped to ``(d_1 ... d_k) x (d_{k+1} ... d_N)``.

* From a dense tensor, :func:`dense_schmidt_values` sweeps TT-SVD left to right: reshape the
  remainder to ``(r_{k-1} d_k) x rest``, SVD, record ``S``, carry ``S V^T`` on. The left
  factors are isometries, so each recorded ``S`` is exactly the Schmidt spectrum of its cut
  (no truncation beyond numerical zeros: values below ``s_max * size * eps`` are dropped).
* From cores that need not be canonical, :func:`mps_schmidt_values` first sweeps right to
  left with QR (each core becomes right-orthonormal, the ``R`` factors move left), then left
  to right with SVD at each bond (``U`` stays, ``S V^T`` moves right): with everything left of
  the bond left-orthonormal and everything right of it right-orthonormal, the bond's singular
  values are the Schmidt values (Schollwoeck, "The density-matrix renormalization group in
  the age of matrix product states", Ann. Phys. 326, 2011, section 4.4, arXiv 1008.3477).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rankwise.errors import RankwiseError


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _nonzero(singular_values: torch.Tensor, size: int) -> int:
    """How many singular values are above the numerical floor ``s_max * size * eps`` (at least one)."""
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 1
    floor = singular_values[0] * size * torch.finfo(singular_values.dtype).eps
    return max(1, int((singular_values > floor).sum()))


def dense_schmidt_values(tensor: torch.Tensor, dims: Sequence[int]) -> list[torch.Tensor]:
    """Schmidt values (descending, unnormalised) at each of the ``len(dims) - 1`` bonds of ``tensor``
    read as an ``N``-site state with site dimensions ``dims`` (C order)."""
    dims = [int(d) for d in dims]
    if tensor.numel() != _product(dims):
        raise RankwiseError(f"site dimensions {tuple(dims)} multiply to {_product(dims)}, not {tensor.numel()}")
    remainder = tensor.detach().to(_compute_dtype(tensor)).reshape(1, -1)
    values = []
    for dim in dims[:-1]:
        remainder = remainder.reshape(remainder.shape[0] * dim, -1)
        _, s, vh = torch.linalg.svd(remainder, full_matrices=False)
        keep = _nonzero(s, max(remainder.shape))
        values.append(s[:keep])
        remainder = s[:keep, None] * vh[:keep]
    return values


def _product(values: Sequence[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def as_site_cores(cores: Sequence[Any]) -> tuple[list[torch.Tensor], list[tuple[int, ...]]]:
    """``cores`` checked and brought to 3-leg form ``(left, d, right)``; also each site's physical
    shape (``(d,)`` for 3-leg cores, ``(m, n)`` for 4-leg operator cores). RankwiseError when the
    cores are not one chain of matching bonds with boundary bonds 1."""
    cores = list(cores)
    if not cores or not all(isinstance(c, torch.Tensor) for c in cores):
        raise RankwiseError("an MPS is a non-empty sequence of tensors (cores)")
    legs = {c.ndim for c in cores}
    if legs not in ({3}, {4}):
        raise RankwiseError(
            f"MPS cores must all be 3-D (left bond, physical, right bond) or all 4-D (left bond, m_k, n_k, "
            f"right bond), got shapes {[tuple(c.shape) for c in cores]}"
        )
    if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
        raise RankwiseError(
            f"the boundary bonds of an MPS must be 1 (first core's left, last core's right), got "
            f"{cores[0].shape[0]} and {cores[-1].shape[-1]}"
        )
    for k in range(len(cores) - 1):
        if cores[k].shape[-1] != cores[k + 1].shape[0]:
            raise RankwiseError(
                f"MPS bond {k + 1} does not match: core {k} has right bond {cores[k].shape[-1]}, core {k + 1} "
                f"has left bond {cores[k + 1].shape[0]}"
            )
    physical = [tuple(c.shape[1:-1]) for c in cores]
    return [c.detach().reshape(c.shape[0], -1, c.shape[-1]) for c in cores], physical


def contract(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor of 3-leg ``cores``, flattened over the physical legs in chain order (C order)."""
    cores, _ = as_site_cores(cores)
    result = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        result = (result @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    return result.reshape(-1)


def operator_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``(prod m_k) x (prod n_k)`` matrix of 4-leg operator cores (see the module docstring)."""
    cores = list(cores)
    _, physical = as_site_cores(cores)
    if any(len(p) != 2 for p in physical):
        raise RankwiseError("operator_matrix needs 4-leg cores (left bond, m_k, n_k, right bond)")
    rows = [p[0] for p in physical]
    columns = [p[1] for p in physical]
    n = len(cores)
    full = contract(cores).reshape([d for p in physical for d in p])  # (m_1, n_1, m_2, n_2, ...)
    order = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
    return full.permute(order).reshape(_product(rows), _product(columns))


def mps_schmidt_values(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Schmidt values (descending, unnormalised) at each bond of an MPS given by (possibly
    non-canonical) cores, by a right-to-left QR sweep and a left-to-right SVD sweep."""
    cores, _ = as_site_cores(cores)
    dtype = torch.float64 if any(c.dtype == torch.float64 for c in cores) else torch.float32
    work = [c.to(dtype) for c in cores]
    for k in range(len(work) - 1, 0, -1):  # right-canonical from the right end
        left, dim, right = work[k].shape
        q, r = torch.linalg.qr(work[k].reshape(left, dim * right).T)  # M^T = Q R, so M = R^T Q^T
        work[k] = q.T.reshape(-1, dim, right)
        work[k - 1] = torch.einsum("adb,cb->adc", work[k - 1], r)
    values = []
    for k in range(len(work) - 1):
        left, dim, right = work[k].shape
        u, s, vh = torch.linalg.svd(work[k].reshape(left * dim, right), full_matrices=False)
        keep = _nonzero(s, max(left * dim, right))
        values.append(s[:keep])
        work[k] = u[:, :keep].reshape(left, dim, keep)
        work[k + 1] = torch.einsum("ab,bdc->adc", s[:keep, None] * vh[:keep], work[k + 1])
    return values
