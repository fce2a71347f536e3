"""VeRA: one pair of frozen random matrices shared by every layer, two trainable scaling vectors per layer.

Kopiczko, Blankevoort & Asano 2024, "VeRA: Vector-based Random Matrix Adaptation",
arXiv 2310.11454 (ICLR 2024).

For a frozen weight ``W`` (``out x in``)

    h = W x + s * Lambda_b B Lambda_d A x,   Lambda_b = diag(b), b in R^out;  Lambda_d = diag(d), d in R^r

with ``A`` (``r x in_max``) and ``B`` (``out_max x r``) frozen, drawn once for the whole model
and sliced to each layer (``A[:, :in]``, ``B[:out]``; ``in_max`` / ``out_max`` are the largest
dimensions among the adapted layers), and ``s = alpha / r``. Only ``b`` and ``d`` train:
``out + r`` parameters per layer. Init (the paper's): ``A`` and ``B`` Kaiming-uniform, ``b = 0``
(the model equals the base at init), ``d = d_initial`` (0.1, the paper's Table 6c choice).

The random matrices are regenerated from ``seed`` (:mod:`~rankwise.adapters.random_basis_family`,
drawn on the CPU, ``A`` then ``B``, from one generator) and are not saved: a saved VeRA
adapter of one layer ``out x in`` holds ``out + r`` numbers. ``seed`` is PEFT's
``projection_prng_key``, and PEFT draws the same matrices from it, so ``export_peft`` writes
PEFT's own VeRA format (``peft_native``; the projections are included, as PEFT's default
``save_projection=True`` does) and PEFT reproduces the outputs.

Deviation: the paper has no ``alpha``; ``s = alpha / r`` is 1 at the default ``alpha = rank``
and otherwise only rescales ``b``'s step (folded into ``vera_lambda_b`` on export).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, PeftNative
from rankwise.adapters.random_basis_family import (
    RandomBasisLayer,
    kaiming_uniform,
    largest_shape,
    placed,
    seeded_generator,
    shared_factory,
)
from rankwise.options import Option


@ADAPTERS.register(
    "vera",
    family="random_basis",
    paper="VeRA: Vector-based Random Matrix Adaptation",
    arxiv="2310.11454",
    supports=LINEAR_LIKE,
)
class VeraLayer(RandomBasisLayer):
    """``base(x) + s * b * (B[:out] (d * (A[:, :in] x)))`` with shared frozen ``A``, ``B`` and trainable ``b``, ``d``."""

    OPTIONS = {
        "d_initial": Option(0.1, float, help="initial value of every entry of the scaling vector d (b starts at 0)"),
    }

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Module], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``A`` (r x in_max) then ``B`` (out_max x r), Kaiming-uniform from one CPU generator seeded by ``seed``."""
        out_max, in_max = largest_shape(bases)
        generator = seeded_generator(options["seed"])
        vera_A = kaiming_uniform((rank, in_max), generator)
        vera_B = kaiming_uniform((out_max, rank), generator)
        factory = shared_factory(bases)
        return {"vera_A": placed(vera_A, factory), "vera_B": placed(vera_B, factory)}

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        self.frozen("vera_A")
        self.frozen("vera_B")
        self.lambda_b = nn.Parameter(torch.empty(self.out_features, **self.factory))
        self.lambda_d = nn.Parameter(torch.empty(self.rank, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            self.lambda_b.zero_()
            self.lambda_d.fill_(self.options["d_initial"])

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices ``A[:r, :in]`` and ``B[:out, :r]`` of the shared matrices."""
        return self.vera_A[: self.rank, : self.in_features], self.vera_B[: self.out_features, : self.rank]

    def delta_weight(self) -> torch.Tensor:
        down, up = self.projections()
        return self.scaling * (self.lambda_b[:, None] * up) @ (self.lambda_d[:, None] * down)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.projections()
        hidden = self.project_in(x, down) * self.lambda_d
        return self.project_out(hidden, up) * (self.scaling * self.lambda_b)

    def peft_native(self) -> PeftNative:
        return PeftNative(
            "VERA",
            {"r": self.rank, "projection_prng_key": self.options["seed"], "save_projection": True,
             "vera_dropout": float(self.options["dropout"]), "d_initial": self.options["d_initial"],
             "fan_in_fan_out": self.kind == "conv1d", "bias": "none", "init_weights": True,
             "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None},
            {"vera_lambda_b": (self.scaling * self.lambda_b).detach(), "vera_lambda_d": self.lambda_d.detach()},
            {"base_model.vera_A": self.vera_A, "base_model.vera_B": self.vera_B},
        )
