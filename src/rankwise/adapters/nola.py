"""NOLA: LoRA factors re-parametrised as linear combinations of frozen random bases.

Koohpayegani, Navaneet, Nooralinejad, Kolouri & Pirsiavash 2024, "NOLA: Compressing LoRA using
Linear Combination of Random Basis", arXiv 2310.02556 (ICLR 2024).

For a frozen weight ``W`` (``out x in``) and rank ``r``

    h = W x + s B A x,   A = A_0 + sum_{i=1}^{k} alpha_i A_i   (r x in),   B = sum_{j=1}^{l} beta_j B_j   (out x r)

with ``s = alpha / r``, frozen random bases ``A_i``, ``B_j`` (entries ``U(-1, 1) / sqrt(k)`` resp.
``/ sqrt(l)``) and only the ``k + l`` coefficients ``alpha``, ``beta`` trained -- a count chosen
freely, independent of the rank and the layer shape. Init as in the authors' release: ``alpha =
beta = 0`` and a frozen ``A_0`` drawn like LoRA's ``A`` (Kaiming-uniform, ``a = sqrt 5``), so
``B = 0`` and the model equals the base at init while ``beta`` gets a gradient through ``A_0``.

Each layer's bases and ``A_0`` are drawn from ``seed`` and the layer's name on the CPU
(:mod:`~rankwise.adapters.random_basis_family`) and are not saved: a saved NOLA adapter holds
``k + l`` numbers per layer. The update is exactly rank-``r`` factored, so the PEFT export
(PEFT has no NOLA) is an exact LoRA (``lora_factors``).

Deviation: the authors regenerate the bases inside every forward and backward pass to save
memory; here they are kept as buffers (``(k r in + l out r)`` numbers per layer in the compute
dtype) and the factors are two ``einsum`` contractions per forward. Quantised NOLA (their
``qnola``) is not offered.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.random_basis_family import GeneratedLoraLayer, layer_key, placed, seeded_generator, shared_factory
from rankwise.layers import features
from rankwise.options import Option


def scaled_uniform(shape: tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` bases of ``shape`` with entries ``U(-1, 1) / sqrt(count)`` (float32, CPU)."""
    return torch.empty((count, *shape), dtype=torch.float32).uniform_(-1.0, 1.0, generator=generator) / math.sqrt(count)


@ADAPTERS.register(
    "nola",
    family="random_basis",
    paper="NOLA: Compressing LoRA using Linear Combination of Random Basis",
    arxiv="2310.02556",
    supports=LINEAR_LIKE,
)
class NolaLayer(GeneratedLoraLayer):
    """``base(x) + s (sum_j beta_j B_j)(A_0 + sum_i alpha_i A_i) x`` with only ``alpha``, ``beta`` trained."""

    OPTIONS = {
        "num_basis_A": Option(1024, int, low=1, help="k: random bases (and trainable coefficients) for A"),
        "num_basis_B": Option(1024, int, low=1, help="l: random bases (and trainable coefficients) for B"),
    }

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Module], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per layer, from ``seed`` and its name: ``A_0``, then the ``A_i``, then the ``B_j``."""
        factory = shared_factory(bases)
        shared = {}
        for name, base in bases.items():
            out_features, in_features = features(base)
            generator = seeded_generator(options["seed"], name)
            start = torch.empty(rank, in_features)
            nn.init.kaiming_uniform_(start, a=math.sqrt(5), generator=generator)
            shared[layer_key(name, "A_0")] = placed(start, factory)
            shared[layer_key(name, "bases_A")] = placed(
                scaled_uniform((rank, in_features), options["num_basis_A"], generator), factory)
            shared[layer_key(name, "bases_B")] = placed(
                scaled_uniform((out_features, rank), options["num_basis_B"], generator), factory)
        return shared

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        for tensor in ("A_0", "bases_A", "bases_B"):
            self.frozen(tensor, self.own_key(tensor))
        self.coefficients_A = nn.Parameter(torch.empty(self.options["num_basis_A"], **self.factory))
        self.coefficients_B = nn.Parameter(torch.empty(self.options["num_basis_B"], **self.factory))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            self.coefficients_A.zero_()
            self.coefficients_B.zero_()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)``: the two mixtures of bases."""
        down = self.A_0 + torch.einsum("k,kri->ri", self.coefficients_A, self.bases_A)
        up = torch.einsum("l,lor->or", self.coefficients_B, self.bases_B)
        return up, down
