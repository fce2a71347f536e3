"""Uni-LoRA: one trainable vector for the whole model, mapped isometrically onto every layer's LoRA factors.

Uni-LoRA, 2025: "Uni-LoRA: One Vector is All You Need", arXiv 2506.00799.

Concatenate the LoRA factors ``A_l`` (``r x in_l``) and ``B_l`` (``out_l x r``) of all ``L``
adapted layers into one vector ``theta_D`` of length ``D = sum_l r (in_l + out_l)``. Uni-LoRA
trains only ``theta_d`` (length ``d << D``) and sets

    theta_D = P theta_d,     P in R^{D x d}:  P[j, c(j)] = 1 / sqrt(n_c(j)),  zero elsewhere

where ``c(j)`` is the (fixed, random) column of row ``j`` and ``n_c`` the number of rows mapped
to column ``c``. Every row has one non-zero and the columns have disjoint supports of unit
norm, so ``P^T P = I_d``: ``P`` is an isometry (``||P theta_d|| = ||theta_d||``), the property
the paper's projection is built for. The assignment is
balanced (each column receives ``floor(D / d)`` or ``ceil(D / d)`` rows, then shuffled), as in
the authors' release, so every entry of ``theta_d`` is used. Per layer

    h = W x + s B_l A_l x,   A_l = (P theta_d)[rows of A_l],  B_l = (P theta_d)[rows of B_l],  s = alpha / r

computed as a gather of ``theta_d`` times the fixed scales. Trainable parameters: ``d`` for the
whole model (``theta_d_length``), independent of the number of layers. Init: ``theta_d`` uniform
in ``[-init_bound, init_bound]`` (both factors come from ``theta_d``, so a zero start would be a
saddle with zero gradient): the model does NOT equal the base at init, by ``O(init_bound^2)``.

The index map ``c`` and the scales are regenerated from ``seed`` on the CPU over the layers in
sorted name order (:mod:`~rankwise.adapters.random_basis_family`) and are never saved: a saved
Uni-LoRA adapter is ``d`` numbers. ``export_peft`` writes PEFT's UNILORA format with
``save_indices=True`` (PEFT's own index generator is a different stream), so PEFT reproduces
the outputs exactly.

Deviation: the paper has no ``alpha``; ``s = alpha / r`` is 1 at the default ``alpha = rank``
(on export it is folded into PEFT's ``unilora_scales_B``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, PeftNative
from rankwise.adapters.random_basis_family import GeneratedLoraLayer, layer_key, placed, seeded_generator, shared_factory
from rankwise.layers import features
from rankwise.options import Option


def balanced_assignment(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A random map of ``rows`` onto ``columns`` in which every column gets ``floor(rows / columns)``
    or ``ceil(rows / columns)`` rows (the extra ones at random columns), shuffled."""
    repeats, extra = divmod(rows, columns)
    assignment = torch.cat([torch.arange(columns).repeat(repeats), torch.randperm(columns, generator=generator)[:extra]])
    return assignment[torch.randperm(rows, generator=generator)]


@ADAPTERS.register(
    "unilora",
    family="random_basis",
    paper="Uni-LoRA: One Vector is All You Need",
    arxiv="2506.00799",
    supports=LINEAR_LIKE,
)
class UniLoraLayer(GeneratedLoraLayer):
    """``base(x) + s B A x`` with ``A``, ``B`` gathered from the one global trainable ``theta_d``."""

    OPTIONS = {
        "theta_d_length": Option(256, int, low=1, help="length d of the one trainable vector shared by all layers"),
        "init_bound": Option(0.02, float, low=0, low_open=True, help="theta_d starts uniform in [-init_bound, init_bound]"),
    }

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Module], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``theta_d`` and, per layer, the columns of ``P`` its factors' entries map to and their scales."""
        length = options["theta_d_length"]
        shapes = {}
        for name in sorted(bases):
            out_features, in_features = features(bases[name])
            shapes[layer_key(name, "index_A")] = (rank, in_features)
            shapes[layer_key(name, "index_B")] = (out_features, rank)
        total = sum(rows * cols for rows, cols in shapes.values())
        assignment = balanced_assignment(total, length, seeded_generator(options["seed"]))
        scale = torch.bincount(assignment, minlength=length).float().clamp(min=1).rsqrt()
        factory = shared_factory(bases)
        shared: dict[str, torch.Tensor] = {}
        for key, chunk in zip(shapes, assignment.split([r * c for r, c in shapes.values()])):
            index = chunk.reshape(shapes[key])
            shared[key] = index.to(factory["device"])
            shared[key.replace("index_", "scale_")] = placed(scale[index], factory)
        bound = options["init_bound"]
        shared["theta_d"] = nn.Parameter(torch.empty(length, **factory).uniform_(-bound, bound))
        return shared

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.scaling = self.alpha / self.rank
        for tensor in ("index_A", "index_B", "scale_A", "scale_B"):
            self.frozen(tensor, self.own_key(tensor))
        self.theta_d = self.shared["theta_d"]

    def initialize(self, stats: Any = None) -> None:
        """Nothing per layer: ``theta_d`` is drawn once, for all layers, in :meth:`make_shared`."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)``: this layer's rows of ``P theta_d``."""
        return self.theta_d[self.index_B] * self.scale_B, self.theta_d[self.index_A] * self.scale_A

    def peft_native(self) -> PeftNative:
        return PeftNative(
            "UNILORA",
            {"r": self.rank, "theta_d_length": self.options["theta_d_length"], "proj_seed": self.options["seed"],
             "save_indices": True, "init_theta_d_bound": self.options["init_bound"],
             "unilora_dropout": float(self.options["dropout"]), "fan_in_fan_out": self.kind == "conv1d",
             "bias": "none", "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
             "modules_to_save": None},
            {"unilora_indices_A": self.index_A, "unilora_indices_B": self.index_B,
             "unilora_scales_A": self.scale_A, "unilora_scales_B": self.scaling * self.scale_B},
            {"base_model.unilora_theta_d": self.theta_d.detach()},
        )
