"""Monarch: each layer a product of two block-diagonal matrices with the Monarch permutation.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra, Re, "Monarch: Expressive Structured
Matrices for Efficient and Accurate Training", arXiv 2204.00595. Each targeted ``out x in``
layer becomes ``y = M x + b`` with

    M = P_2 blockdiag(w2) P_1 blockdiag(w1)

(index formula and shapes in :mod:`rankwise.pretrain.blocks`), ``w1`` and ``w2`` trained from
scratch: ``min(m, n) (m + n) / nblocks`` weights per layer (``2 n^2 / nblocks`` when square),
the authors' rectangular layout (``MonarchLinear`` in github.com/HazyResearch/fly, default
``nblocks`` 4). The forward is two batched block products, never the dense ``M``. Each block
pair ``(l, k)`` of ``M`` has rank ``T(l, k)`` (``q / nblocks`` for the square layout), and
:func:`rankwise.pretrain.project_monarch` projects a dense matrix onto the class (option
``init="project"`` starts from the projection of the dense init, the paper's dense-to-sparse
path; the default ``"random"`` trains from scratch).

Init (our choice where the release differs): the release draws each block Kaiming-uniform
(the ``nn.Linear`` default, whatever init the model uses). Here ``w1 ~ N(0, a^2)``,
``w2 ~ N(0, b^2)`` with ``T a^2 b^2 = sigma^2`` -- every entry of ``M`` has the variance of the
dense layer's fresh init (``T`` the mean block rank) -- and ``a^2 / b^2 = R / P`` so both factors
change the activations' scale equally, the same rule as ``lowrank``. No rank: the size is set
by ``nblocks``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.options import Option
from rankwise.pretrain.blocks import block_rank_counts, monarch_dense, monarch_multiply, monarch_shapes, project_monarch
from rankwise.pretrain.core import PARAMETRISATIONS, DenseLayer, Parametrisation, ParametrisedLayer, bias_parameter


class MonarchLinear(ParametrisedLayer, nn.Module):
    """``y = x M^T + b`` with ``M`` the Monarch matrix of ``blkdiag1`` / ``blkdiag2``."""

    def __init__(self, layer: DenseLayer, w1: torch.Tensor, w2: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.nblocks = w1.shape[0]
        self.blkdiag1 = nn.Parameter(w1.to(device=layer.device, dtype=layer.dtype))
        self.blkdiag2 = nn.Parameter(w2.to(device=layer.device, dtype=layer.dtype))
        self.bias = bias_parameter(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = monarch_multiply(x, self.blkdiag1, self.blkdiag2)
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> torch.Tensor:
        return monarch_dense(self.blkdiag1, self.blkdiag2)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nblocks={self.nblocks}"


@PARAMETRISATIONS.register(
    "monarch",
    family="block_structured",
    paper="Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
    arxiv="2204.00595",
)
class Monarch(Parametrisation):
    """Two block-diagonal factors with the Monarch permutation, trained from scratch (module docstring)."""

    uses_rank = False
    trains_linear_weights = False
    OPTIONS = {
        "nblocks": Option(4, int, low=1, help="blocks per factor; must divide both sizes of every targeted layer"),
        "init": Option("random", str, choices=("random", "project"),
                       help="random: Gaussian blocks at the dense init's scale; project: the Monarch projection "
                            "of the dense init"),
        "seed": Option(None, int, nullable=True, help="seed of the random init; None = torch's global RNG"),
    }

    def __init__(self, rank: int | None = None, **options: Any) -> None:
        super().__init__(rank, **options)
        seed = self.options["seed"]
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def check(self, layer: DenseLayer) -> None:
        monarch_shapes(layer.out_features, layer.in_features, self.options["nblocks"])

    def layer_types(self) -> tuple[type, ...]:
        return (MonarchLinear,)

    def build(self, layer: DenseLayer) -> MonarchLinear:
        if self.options["init"] == "project":
            w1, w2 = project_monarch(layer.weight, self.options["nblocks"])
            return MonarchLinear(layer, w1, w2)
        w1_shape, w2_shape = monarch_shapes(layer.out_features, layer.in_features, self.options["nblocks"])
        terms = float(block_rank_counts(w1_shape, w2_shape).float().mean())
        sigma = layer.init_std()
        product = sigma / math.sqrt(terms)  # a * b
        ratio = math.sqrt(w2_shape[2] / w1_shape[2])  # a / b = sqrt(R / P)
        std1, std2 = math.sqrt(product * ratio), math.sqrt(product / ratio)
        w1 = torch.randn(w1_shape, generator=self.generator) * std1
        w2 = torch.randn(w2_shape, generator=self.generator) * std2
        return MonarchLinear(layer, w1, w2)
