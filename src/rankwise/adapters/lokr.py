"""LoKr: the update as a Kronecker product of a small and a (low-rank) large factor.

Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", arXiv 2309.14859 (LyCORIS LoKr); the Kronecker adapter of DiffuseKronA (Marjit et
al. 2024, "DiffuseKronA: A Parameter Efficient Fine-tuning Method for Personalized Diffusion
Models", arXiv 2402.17412) is the same form. With ``out = a b`` and ``in = c d``::

    dW = s * W1 (x) W2        W1: a x c,  W2: b x d,  s = alpha / r

``(a, b) = factorization(out, decompose_factor)``, ``(c, d) = factorization(in, decompose_factor)``
(:func:`~rankwise.adapters.kronecker_family.factorization`: the divisor nearest ``sqrt`` unless a
factor is given). ``W2`` is itself low rank, ``W2 = W2a W2b`` (``b x r``, ``r x d``), when
``r < max(b, d) / 2``, else a full matrix; ``W1`` likewise (``W1a W1b``) only with
``decompose_both`` and ``r < max(a, c) / 2`` -- PEFT 0.21's rules, so the tensors are PEFT's.
Init as PEFT: ``W1`` (or ``W1a``) zero, the rest kaiming-uniform (``a = sqrt 5``): zero update.
Parameters: ``a c`` (or ``r (a + c)``) plus ``b d`` (or ``r (b + d)``). The rank of ``W1 (x) W2``
is ``rank(W1) rank(W2)``.

``adapter_forward`` applies ``W1 X W2^T`` to each input row read as a ``c x d`` matrix (never the
``out x in`` product, :func:`~rankwise.adapters.kronecker_family.kron_apply`).

Deviations from PEFT's LoKr: its ``rank_dropout`` / ``module_dropout`` are not offered (``dropout``
acts on the adapter path's input); Linear-like layers only. Export: PEFT's LoKr format
(``lokr_w1`` / ``lokr_w1_a`` ..., ``peft_type`` "LOKR") for ``nn.Linear`` layers; otherwise the
best rank-k LoRA of the update with its error reported.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer, PeftNative
from rankwise.adapters.kronecker_family import factorization, kron_apply
from rankwise.options import Option


def lokr_shapes(in_features: int, out_features: int, rank: int, decompose_both: bool = False,
                decompose_factor: int = -1) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """``((a, c), (b, d), decompose_w1, decompose_w2)``: the shapes of ``W1``, ``W2`` and which are low rank."""
    a, b = factorization(out_features, decompose_factor)
    c, d = factorization(in_features, decompose_factor)
    return (a, c), (b, d), decompose_both and rank < max(a, c) / 2, rank < max(b, d) / 2


@ADAPTERS.register(
    "lokr",
    family="kronecker",
    paper="Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation",
    arxiv="2309.14859",
    supports=LINEAR_LIKE,
)
class LokrLayer(AdapterLayer):
    """``s * W1 (x) W2`` with ``W2`` (and optionally ``W1``) low-rank factored."""

    OPTIONS = {
        "decompose_both": Option(False, bool, help="also factor W1 as W1a W1b when r < max(a, c) / 2"),
        "decompose_factor": Option(-1, int, low=-1,
                                   help="split each dimension as (factor, dim / factor) when it divides; -1 = near sqrt"),
    }

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        return max(in_features, out_features)

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        if self.options["decompose_factor"] == 0:
            raise self.error("decompose_factor must be -1 (near sqrt) or a positive factor, got 0")
        (a, c), (b, d), self.decompose_w1, self.decompose_w2 = lokr_shapes(
            self.in_features, self.out_features, self.rank, self.options["decompose_both"],
            self.options["decompose_factor"])
        self.scaling = self.alpha / self.rank
        for name, shape, factored in (("lokr_w1", (a, c), self.decompose_w1), ("lokr_w2", (b, d), self.decompose_w2)):
            if factored:
                setattr(self, f"{name}_a", nn.Parameter(torch.empty(shape[0], self.rank, **self.factory)))
                setattr(self, f"{name}_b", nn.Parameter(torch.empty(self.rank, shape[1], **self.factory)))
            else:
                setattr(self, name, nn.Parameter(torch.empty(*shape, **self.factory)))

    def factor_names(self) -> tuple[str, ...]:
        names = ("lokr_w1_a", "lokr_w1_b") if self.decompose_w1 else ("lokr_w1",)
        return names + (("lokr_w2_a", "lokr_w2_b") if self.decompose_w2 else ("lokr_w2",))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            for name in self.factor_names():
                nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
            nn.init.zeros_(self.lokr_w1_a if self.decompose_w1 else self.lokr_w1)

    def kronecker_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.decompose_w1 else self.lokr_w1
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.decompose_w2 else self.lokr_w2
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.kronecker_factors()
        return self.scaling * torch.kron(w1, w2)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.kronecker_factors()
        return self.scaling * kron_apply(x.to(w1.dtype), w1, w2)

    def peft_native(self) -> PeftNative | None:
        if self.kind != "linear":
            return None
        config = {"r": self.rank, "alpha": self.alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                  "decompose_both": self.options["decompose_both"],
                  "decompose_factor": self.options["decompose_factor"], "rank_dropout_scale": False,
                  "use_effective_conv2d": False, "init_weights": True, "rank_pattern": {}, "alpha_pattern": {},
                  "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
                  "modules_to_save": None}
        return PeftNative("LOKR", config, {name: getattr(self, name) for name in self.factor_names()})
