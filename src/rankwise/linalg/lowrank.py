"""Turning a truncated SVD into the two factors of a low-rank layer.

A rank-``k`` approximation ``W_k = U_k diag(S_k) V_k^T`` is stored as two matrices whose
product is ``W_k``. Splitting the singular values evenly,

    up   = U_k diag(sqrt(S_k))        (out x k)
    down = diag(sqrt(S_k)) V_k^T      (k x in)

gives both factors the same Frobenius norm (``||up||_F^2 = ||down||_F^2 = sum S_k``), the
balanced choice of LoRD (arXiv 2309.14021) and of SVD-LLM / ASVD, and keeps either factor
from carrying the whole dynamic range of the spectrum (which matters in bf16).
"""

from __future__ import annotations

import torch


def split_singular_values(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down) = (U diag(sqrt S), diag(sqrt S) Vh)`` so that ``up @ down = U diag(S) Vh``."""
    if u.ndim != 2 or s.ndim != 1 or vh.ndim != 2 or u.shape[1] != s.shape[0] or vh.shape[0] != s.shape[0]:
        raise ValueError(
            f"expected U (m x k), S (k,), Vh (k x n); got {tuple(u.shape)}, {tuple(s.shape)}, {tuple(vh.shape)}"
        )
    root = s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh
