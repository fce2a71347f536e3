"""Singular value spectrum of a weight matrix.

``spectrum(W)`` returns ``sigma_1 >= sigma_2 >= ... >= sigma_min(m,n) >= 0`` of ``W`` as a
float32 tensor on W's device (computed by :func:`rankwise.linalg.svd` in float32, float64
for float64 inputs). ``W`` may be a 2-D tensor, any Linear-like layer (``nn.Linear``,
transformers' ``Conv1D``, a bitsandbytes quantized Linear: its ``out x in`` weight, read
through :func:`rankwise.layers.dense_weight`, dequantised), a
:class:`~rankwise.nn.FactorizedLinear` (the dense product ``up @ down`` it applies) or an
adapter layer (:class:`~rankwise.adapters.AdapterLayer`: the weight it applies, the base
weight plus ``delta_weight()`` unless already merged).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from rankwise.adapters.base import AdapterLayer
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight, is_linear_like
from rankwise.linalg.svd import svd
from rankwise.nn import FactorizedLinear

MatrixLike = Union[torch.Tensor, nn.Module]


def as_matrix(matrix: MatrixLike) -> torch.Tensor:
    """The 2-D weight behind ``matrix`` (detached)."""
    if isinstance(matrix, FactorizedLinear):
        with torch.no_grad():
            return matrix.up.weight.float() @ matrix.down.weight.float()
    if isinstance(matrix, AdapterLayer):
        with torch.no_grad():
            weight = dense_weight(matrix.base)
            return weight if matrix.merged else weight.float() + matrix.delta_weight().float()
    if isinstance(matrix, nn.Module) and is_linear_like(matrix):
        return dense_weight(matrix)
    if isinstance(matrix, torch.Tensor) and matrix.ndim == 2 and matrix.numel() > 0:
        return matrix.detach()
    raise RankwiseError(
        f"expected a non-empty 2-D tensor, a Linear-like layer (Linear, Conv1D, bitsandbytes Linear), a "
        f"FactorizedLinear or an adapter layer, got "
        f"{type(matrix).__name__}{tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else ''}"
    )


def spectrum(matrix: MatrixLike) -> torch.Tensor:
    """Singular values of ``matrix``, descending, float32."""
    _, singular_values, _ = svd(as_matrix(matrix))
    return singular_values.float()


def nonzero_spectrum(singular_values: torch.Tensor, what: str) -> torch.Tensor:
    """``singular_values`` in float64, or RankwiseError when they are all zero (``what`` is undefined then)."""
    singular_values = singular_values.double()
    if singular_values.numel() == 0 or singular_values.max() <= 0:
        raise RankwiseError(f"the {what} of an all-zero matrix is undefined; pass a non-zero matrix")
    return singular_values
