"""SAID: the whole model fine-tuned in one random d-dimensional subspace, with a scalar per layer.

Aghajanyan, Zettlemoyer & Gupta 2021, "Intrinsic Dimensionality Explains the Effectiveness of
Language Model Fine-Tuning", ACL 2021, arXiv 2012.13255 (SAID, structure-aware intrinsic
dimension); the subspace training it builds on (DID) is Li, Farkhoor, Liu & Yosinski 2018,
"Measuring the Intrinsic Dimension of Objective Landscapes", arXiv 1804.08838.

All adapted weights move together along one trainable vector ``theta_d in R^d`` (``d`` = the
``rank``), shared by every layer of the ``adapt`` call, through a fixed random projection:

    W_l = W0_l + lambda_l * reshape(P_l theta_d)      (SAID, ``layer_scalars=True``)
    W_l = W0_l + reshape(P_l theta_d)                 (DID,  ``layer_scalars=False``)

``P_l`` (``out_l in_l x d``) is layer ``l``'s block of rows of the model-wide projection ``P``:
Fastfood (``projection="fastfood"``, the papers' choice) or very sparse
(``projection="sparse"``), both with entries of variance ``1/d'``
(:mod:`rankwise.linalg.subspace`). ``theta_d = 0`` at init, so the output equals the base
model's; ``lambda_l = 1`` at init (the update is 0 whatever ``lambda``, and ``lambda = 0`` would
leave both without a gradient). Trainable parameters: ``d`` shared, plus one ``lambda_l`` per
adapted layer.

Frozen randomness from stored seeds: ``P_l`` is regenerated on the CPU from the option ``seed``
and the layer's module name (non-persistent buffers), so the adapter file holds only
``theta_d`` (``d`` numbers, stored once and re-tied to every layer on load), the ``lambda_l``
and the seed in the JSON config -- about ``4 (d + L)`` bytes in fp32 for ``L`` layers -- and it
reloads bit-identically on the CPU. Held in memory: ``3 out in`` numbers per layer for
Fastfood (signs, permutation, scaled Gaussian of every block), about ``d sqrt(out in)``
non-zeros for the sparse projection.

Deviations: SAID counts its ``m`` layer scalars inside ``d`` (``theta`` has ``d - m`` entries);
here ``theta_d`` has ``d`` entries and the ``L`` scalars come on top. The papers apply the
subspace to every parameter of the model; here it covers the ``targets`` (all linear layers by
default), biases and norms stay frozen. The projection is drawn per layer (independent seeds)
rather than as one model-wide Fastfood over the concatenated parameters, which spans the same
kind of random subspace.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer
from rankwise.layers import compute_dtype
from rankwise.linalg.subspace import PROJECTIONS
from rankwise.options import Option

#: no per-layer bound on d: the subspace is the whole model's
LARGEST_DIMENSION = 2**31 - 1


@ADAPTERS.register(
    "said",
    family="subspace",
    paper="Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning",
    arxiv="2012.13255",
    supports=LINEAR_LIKE,
)
class SaidLayer(AdapterLayer):
    """``W0 + lambda_l reshape(P_l theta_d)`` with ``theta_d`` shared by every layer, ``P_l`` from a seed."""

    OPTIONS = {
        "projection": Option("fastfood", str, choices=tuple(PROJECTIONS),
                             help="random projection P: fastfood (the papers') or very sparse"),
        "layer_scalars": Option(True, bool, help="SAID's trainable scalar per layer (False: DID, Li et al. 2018)"),
        "seed": Option(0, int, low=0, help="seed of the projections (with each layer's module name)"),
    }

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        return LARGEST_DIMENSION

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Module], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
        first = next(iter(bases.values()))
        theta = torch.zeros(rank, device=first.weight.device, dtype=compute_dtype(first))
        return {"said_theta": nn.Parameter(theta)}

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.said_theta = self.shared["said_theta"]
        if self.options["layer_scalars"]:
            self.said_lambda = nn.Parameter(torch.empty((), **self.factory))
        seed = (self.options["seed"] * 0x9E3779B1 + zlib.crc32(self.name.encode())) % (2**63)
        self.projection = PROJECTIONS[self.options["projection"]](
            self.out_features * self.in_features, self.rank, seed, **self.factory)

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            self.said_theta.zero_()
            if self.options["layer_scalars"]:
                self.said_lambda.fill_(1.0)

    def delta_weight(self) -> torch.Tensor:
        update = self.projection(self.said_theta.to(self.factory["dtype"])).view(self.out_features, self.in_features)
        return self.said_lambda * update if self.options["layer_scalars"] else update
