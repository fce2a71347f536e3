"""Block-diagonal and Monarch products: the math the block-structured parametrisations share.

**Monarch** (Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra, Re, "Monarch:
Expressive Structured Matrices for Efficient and Accurate Training", arXiv 2204.00595): a
product of two block-diagonal matrices interleaved with the reshape-transpose permutation,
``M = P_2 L P_1 R``. With ``R = blockdiag(w1)``, ``w1`` of shape ``(K, Q, P)`` (``K`` blocks of
``Q x P``, input ``n = K P``) and ``L = blockdiag(w2)``, ``w2`` of shape ``(L, S, R)`` (``K Q = L R``,
output ``m = L S``), :func:`monarch_multiply` computes ``y = M x`` as

    h[k, q]  = sum_p w1[k, q, p] x[k P + p]              first block-diagonal factor
    h'[l, r] = h[f]  with  f = k Q + q = r L + l         P_1: regroup the K Q entries as (R, L)
    y[s L + l] = sum_r w2[l, s, r] h'[l, r]              second factor, then P_2: (L, S) -> (S, L)

(the layout of the authors' ``blockdiag_butterfly_multiply``; for ``K = L = sqrt(n)`` both
permutations are the paper's transpose ``P``). Hence

    M[s L + l, k P + p] = sum_{f : f mod L = l, f div Q = k} w2[l, s, f div L] w1[k, f mod Q, p],

so the ``S x P`` block ``(l, k)`` of ``M`` (rows ``s L + l``, columns ``k P + p``) is a sum of
``T(l, k)`` rank-one terms, and every row ``w1[k, q]`` and column ``w2[l, :, r]`` belongs to exactly
one block. The blocks are independent, which gives the paper's projection
(:func:`project_monarch`): the closest Monarch matrix to ``W`` in Frobenius norm takes, in
every block, the best rank-``T(l, k)`` approximation of ``W``'s block (Eckart-Young), split
``sqrt``-evenly between ``w2``'s columns and ``w1``'s rows.

:func:`monarch_shapes` is the authors' rectangular layout (``MonarchLinear``): ``nblocks``
blocks per factor, ``w1`` square on the smaller side. :func:`block_diagonal_multiply` is one
block-diagonal factor alone (structured_ffn's BlockDense).
"""

from __future__ import annotations

import torch

from rankwise.errors import RankwiseError
from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import svd


def monarch_shapes(out_features: int, in_features: int, nblocks: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of ``(w1, w2)`` for an ``out x in`` Monarch layer with ``nblocks`` blocks per factor.

    ``in < out``: ``w1 (b, in/b, in/b)``, ``w2 (b, out/b, in/b)``; else ``w1 (b, out/b, in/b)``,
    ``w2 (b, out/b, out/b)``. Both sizes must be multiples of ``nblocks``.
    """
    if in_features % nblocks or out_features % nblocks:
        raise RankwiseError(
            f"a {out_features} x {in_features} layer cannot be split into {nblocks} blocks per side; choose nblocks "
            f"dividing both sizes of every targeted layer (or leave that layer out of targets)"
        )
    in_block, out_block = in_features // nblocks, out_features // nblocks
    if in_features < out_features:
        return (nblocks, in_block, in_block), (nblocks, out_block, in_block)
    return (nblocks, out_block, in_block), (nblocks, out_block, out_block)


def _check_shapes(w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    if w1.ndim != 3 or w2.ndim != 3:
        raise RankwiseError(f"Monarch factors are 3-D block stacks, got shapes {tuple(w1.shape)} and {tuple(w2.shape)}")
    k, q, p = w1.shape
    l, s, r = w2.shape
    if k * q != l * r:
        raise RankwiseError(f"Monarch factors do not chain: w1 {tuple(w1.shape)} gives {k * q} values, "
                            f"w2 {tuple(w2.shape)} takes {l * r}")
    return k, q, p, l, s, r


def monarch_multiply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``x M^T`` for the Monarch matrix ``M`` of ``(w1, w2)`` (module docstring), over ``x``'s last dim."""
    k, q, p, l, s, r = _check_shapes(w1, w2)
    batch = x.shape[:-1]
    h = torch.einsum("kqp,nkp->nkq", w1, x.reshape(-1, k, p))
    h = h.reshape(-1, r, l).transpose(1, 2)
    y = torch.einsum("lsr,nlr->nsl", w2, h)
    return y.reshape(*batch, s * l)


def monarch_dense(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The ``out x in`` Monarch matrix of ``(w1, w2)``."""
    k, _, p, _, _, _ = _check_shapes(w1, w2)
    eye = torch.eye(k * p, dtype=w1.dtype, device=w1.device)
    return monarch_multiply(eye, w1, w2).T


def _block_pairs(w1_shape: tuple[int, int, int], w2_shape: tuple[int, int, int]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """``{(l, k): [(q, r), ...]}``: the rank-one terms of each block of the Monarch matrix."""
    _, q_count, _ = w1_shape
    l_count, _, _ = w2_shape
    pairs: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for f in range(w1_shape[0] * q_count):
        pairs.setdefault((f % l_count, f // q_count), []).append((f % q_count, f // l_count))
    return pairs


def project_monarch(weight: torch.Tensor, nblocks: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``(w1, w2)`` of the Monarch matrix closest to ``weight`` (``out x in``) in Frobenius norm.

    The authors' rectangular layout with ``nblocks`` blocks per factor (:func:`monarch_shapes`);
    per block ``(l, k)`` the truncated SVD of the paper's projection (module docstring). The SVDs
    run in float32 (float64 for float64 input); the factors come back in ``weight``'s dtype.
    ``monarch_dense(*project_monarch(W))`` is the projection of ``W``, and equals ``W`` when ``W``
    is a Monarch matrix of that layout.
    """
    if weight.ndim != 2:
        raise RankwiseError(f"project_monarch takes a 2-D out x in matrix, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    w1_shape, w2_shape = monarch_shapes(out_features, in_features, nblocks)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dense = weight.detach().to(work)
    w1 = torch.zeros(w1_shape, dtype=work, device=weight.device)
    w2 = torch.zeros(w2_shape, dtype=work, device=weight.device)
    _, _, p_count = w1_shape
    l_count, s_count, _ = w2_shape
    for (l, k), terms in _block_pairs(w1_shape, w2_shape).items():
        rows = torch.arange(s_count, device=weight.device) * l_count + l
        block = dense[rows][:, k * p_count:(k + 1) * p_count]
        u, sv, vh = svd(block, dtype=work)
        count = min(len(terms), sv.numel())
        left, right = split_singular_values(u[:, :count], sv[:count], vh[:count])
        for t, (q, r) in enumerate(terms[:count]):
            w2[l, :, r] = left[:, t]
            w1[k, q, :] = right[t]
    return w1.to(weight.dtype), w2.to(weight.dtype)


def block_rank_counts(w1_shape: tuple[int, int, int], w2_shape: tuple[int, int, int]) -> torch.Tensor:
    """``T(l, k)``: how many rank-one terms block ``(l, k)`` of the Monarch matrix holds."""
    counts = torch.zeros(w2_shape[0], w1_shape[0], dtype=torch.int64)
    for (l, k), terms in _block_pairs(w1_shape, w2_shape).items():
        counts[l, k] = len(terms)
    return counts


def block_diagonal_multiply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x D^T`` for ``D = blockdiag(blocks)``, ``blocks`` of shape ``(K, Q, P)`` (input ``K P``, output ``K Q``)."""
    k, q, p = blocks.shape
    batch = x.shape[:-1]
    return torch.einsum("kqp,nkp->nkq", blocks, x.reshape(-1, k, p)).reshape(*batch, k * q)


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """``U V^T`` of the thin SVD ``matrix = U S V^T`` (the nearest matrix with orthonormal rows or columns)."""
    u, _, vh = svd(matrix)
    return u @ vh
