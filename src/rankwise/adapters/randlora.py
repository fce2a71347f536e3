"""RandLoRA: a full-rank update from learned diagonal scalings of frozen random low-rank bases.

Albert, Zhang, Saratchandran, Rodriguez-Opazo, van den Hengel & Abbasnejad 2025, "RandLoRA:
Full-rank parameter-efficient fine-tuning of large models", arXiv 2502.00987 (ICLR 2025).

For a frozen weight ``W`` (``out x in``) let ``m = min(out, in)``, ``M = max(out, in)`` and
``N = ceil(m / r)`` (enough rank-``r`` bases to reach rank ``m``). Then

    dW' = s * sum_{i=1}^{N} B_i Lambda_i A Gamma_i          (M x m)
    dW  = dW'  if in == m,  else dW'^T

with ``A`` (``r x m``, shared by the N terms) and ``B_i`` (``M x r``) frozen random,
``Lambda_i = diag(lambda[:, i])`` (``r x r``) and ``Gamma_i = diag(gamma[i])`` (``m x m``)
trainable, and ``s = alpha / r``. Each term has rank at most ``r``; their sum has rank ``m``
(full) for generic values: ``N (r + m)`` trainable scalars per layer -- O(m) per basis, about
``m + m^2 / r`` in all, against ``r (m + M)`` for LoRA at rank ``r``. Init: ``lambda = 0`` (the
model equals the base at init), ``gamma = 1 / m`` (PEFT's RandLoRA init).

Layout: one random ``A`` (``r x 1 x m_max``) and one ``B`` (``M_max x N_max x r``) for the whole
model, sliced to each layer (``m_max`` / ``M_max`` / ``N_max`` from the largest adapted shape);
flattening ``B[:M, :N]`` to ``M x N r`` gives ``B_i`` as the columns ``i, i + N, i + 2N, ...``.
This is the layout of PEFT's RandLoRA, so ``export_peft``
writes PEFT's own format (``peft_native``, ``randlora_alpha = alpha``) exactly.
Both are drawn from ``seed`` on the CPU (:mod:`~rankwise.adapters.random_basis_family`),
uniform and scaled to unit variance, and are not saved.

Deviations: PEFT's default ``randlora_alpha`` is ``20 r`` (here ``alpha`` defaults to ``r``, i.e.
``s = 1``: pass ``alpha=20 * rank`` for PEFT's scale); PEFT draws the bases in bf16 where available
and normalises by their empirical std, so the same seed gives other numbers than PEFT (an export
carries our tensors). The paper's sparse random bases (``sparse`` / ``very_sparse``) are not offered.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, PeftNative
from rankwise.adapters.random_basis_family import RandomBasisLayer, largest_shape, placed, seeded_generator, shared_factory


def unit_uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``U(-sqrt 3, sqrt 3)``: zero mean, unit variance, float32 on the CPU."""
    bound = math.sqrt(3.0)
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def number_of_bases(out_features: int, in_features: int, rank: int) -> int:
    """``N = ceil(min(out, in) / r)``: the fewest rank-``r`` bases whose ranks add up to full rank."""
    return -(-min(out_features, in_features) // rank)


@ADAPTERS.register(
    "randlora",
    family="random_basis",
    paper="RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
    arxiv="2502.00987",
    supports=LINEAR_LIKE,
)
class RandLoraLayer(RandomBasisLayer):
    """``base(x) + s * sum_i B_i diag(lambda_i) A diag(gamma_i) x`` (transposed when out < in)."""

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Module], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``A`` (r x 1 x m_max) then ``B`` (M_max x N_max x r), unit-variance uniform from ``seed``."""
        out_max, in_max = largest_shape(bases)
        generator = seeded_generator(options["seed"])
        shared_a = unit_uniform((rank, 1, min(out_max, in_max)), generator)
        shared_b = unit_uniform((max(out_max, in_max), number_of_bases(out_max, in_max, rank), rank), generator)
        factory = shared_factory(bases)
        return {"randlora_A": placed(shared_a, factory), "randlora_B": placed(shared_b, factory)}

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        self.min_dim, self.max_dim = min(self.out_features, self.in_features), max(self.out_features, self.in_features)
        self.num_bases = number_of_bases(self.out_features, self.in_features, self.rank)
        self.frozen("randlora_A")
        self.frozen("randlora_B")
        self.lambdas = nn.Parameter(torch.empty(self.rank, self.num_bases, **self.factory))
        self.gammas = nn.Parameter(torch.empty(self.num_bases, self.min_dim, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            self.lambdas.zero_()
            self.gammas.fill_(1.0 / max(self.gammas.shape))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B_bar, A_bar)``: ``B_bar = B[:M, :N]`` flattened to ``M x N r`` and ``A_bar`` (``N r x m``)
        with row ``k N + i`` = ``lambda[k, i] A[k] * gamma[i]``, so that ``dW' = s B_bar A_bar``."""
        shared_a = self.randlora_A[: self.rank, :, : self.min_dim]
        scaled = self.lambdas[:, :, None] * shared_a * self.gammas[None]
        up = self.randlora_B[: self.max_dim, : self.num_bases, : self.rank].reshape(self.max_dim, -1)
        return up, scaled.reshape(-1, self.min_dim)

    def delta_weight(self) -> torch.Tensor:
        up, down = self.factors()
        update = self.scaling * (up @ down)
        return update if self.in_features == self.min_dim else update.T

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.factors()
        if self.in_features == self.min_dim:
            return self.project_out(self.project_in(x, down), up) * self.scaling
        return self.project_out(self.project_in(x, up.T), down.T) * self.scaling

    def peft_native(self) -> PeftNative:
        return PeftNative(
            "RANDLORA",
            {"r": self.rank, "randlora_alpha": self.alpha, "projection_prng_key": self.options["seed"],
             "save_projection": True, "sparse": False, "very_sparse": False,
             "randlora_dropout": float(self.options["dropout"]), "fan_in_fan_out": self.kind == "conv1d",
             "bias": "none", "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
             "modules_to_save": None},
            {"randlora_lambda": self.lambdas.detach(), "randlora_gamma": self.gammas.detach()},
            {"base_model.randlora_A": self.randlora_A, "base_model.randlora_B": self.randlora_B},
        )
