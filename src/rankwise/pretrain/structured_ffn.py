"""Structured feed-forward layers (low-rank, block-dense, block-shuffle) with self-guided training.

Wei, Moalla, Pascanu, Gulcehre, "Building on Efficient Foundations: Effectively Training LLMs
with Structured Feedforward Layers", arXiv 2406.16450. Only the FFN layers are replaced
(default targets: the ``mlp`` / ``feed_forward`` / ``ffn`` children, and BERT's
``intermediate.dense`` / ``output.dense``), each ``out x in`` (``m x n``) weight by one of

* ``lowrank``:      ``W = B A`` (``m x r``, ``r x n``), ``r (m + n)`` weights;
* ``block_dense``:  ``W = B blockdiag(D)``, ``D`` of shape ``(b, r/b, n/b)``, ``B`` ``m x r`` --
  the paper's BlockDense, ``r (m + n / b)`` weights;
* ``block_shuffle``: ``W = P_2 blockdiag(w2) P_1 blockdiag(w1)`` -- the paper's BlockShuffle,
  the Monarch product of :mod:`rankwise.pretrain.blocks`, ``min(m, n) (m + n) / b`` weights.

Self-guided training (the paper's Sec. 4): during the first ``guided_fraction`` of the run a
dense guide ``G`` (``m x n``, initialised to the structured product, so the output at init is
the structured layer's) is trained alongside and mixed in,

    y = alpha_t x G^T + (1 - alpha_t) x W_struct^T + b,
    alpha_t = (1 + cos(pi t / t_g)) / 2   (cosine; linear: 1 - t / t_g),  t_g = guided_fraction * total_steps,

so early training is dense and the structured factors take over gradually; at ``t = t_g`` the
guide is removed from the layer and from the optimizer (its parameter and state are freed), and
the layer is purely structured. ``dense_weight()`` is ``alpha G + (1 - alpha) W_struct``.

Defaults follow the authors' release (github.com/CLAIRE-Labo/StructuredFFN): the guide lasts
half the run (``max_step_ratio`` 0.5) on a cosine decay; ``nblocks`` 4 for block_dense and 2 for
block_shuffle; the low-rank factors start from the SVD of a dense init (``post_init: svd``,
here the layer's own fresh weight: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``) and the block
factors orthogonal (``post_init: ortho``: the polar factor of a Gaussian draw). Deviations:
the release's optional stochastic skipping of the guide (``reduce_flop``) is not offered; the
bias is the dense layer's, kept as initialised (the release zero-initialises its own).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import svd
from rankwise.options import Option
from rankwise.pretrain.blocks import (
    block_diagonal_multiply,
    monarch_dense,
    monarch_multiply,
    monarch_shapes,
    polar_factor,
)
from rankwise.pretrain.core import PARAMETRISATIONS, DenseLayer, Parametrisation, ParametrisedLayer, bias_parameter

STRUCTURES = ("lowrank", "block_dense", "block_shuffle")
#: the release's number of blocks per structure
DEFAULT_NBLOCKS = {"block_dense": 4, "block_shuffle": 2}
#: the FFN layers of LLaMA / GPT-2 (``mlp.*``), other decoders (``feed_forward.*``, ``ffn.*``) and BERT
FFN_TARGETS = r".*\.(mlp|feed_forward|ffn)\.[^.]+|.*\.intermediate\.dense|.*\.layer\.\d+\.output\.dense"


class StructuredLinear(ParametrisedLayer, nn.Module):
    """One structured FFN weight plus, while self-guided training lasts, its dense guide."""

    def __init__(self, layer: DenseLayer, structure: str, factors: dict[str, torch.Tensor], guided: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.structure = layer.in_features, layer.out_features, structure
        like = {"device": layer.device, "dtype": layer.dtype}
        if structure == "lowrank":
            self.down = nn.Linear(layer.in_features, factors["down"].shape[0], bias=False, **like)
            self.up = nn.Linear(factors["up"].shape[1], layer.out_features, bias=False, **like)
            with torch.no_grad():
                self.down.weight.copy_(factors["down"])
                self.up.weight.copy_(factors["up"])
        else:
            self.blkdiag1 = nn.Parameter(factors["w1"].to(**like))
            self.blkdiag2 = nn.Parameter(factors["w2"].to(**like))
        self.bias = bias_parameter(layer)
        self.guide: nn.Linear | None = None
        self.register_buffer("guide_ratio", torch.ones((), dtype=torch.float32, device=layer.device))
        if guided:
            self.guide = nn.Linear(layer.in_features, layer.out_features, bias=False, **like)
            with torch.no_grad():
                self.guide.weight.copy_(self.structured_weight())
        else:
            self.guide_ratio.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        if self.guide is not None and prefix + "guide.weight" not in state_dict:
            self.guide = None  # a checkpoint saved after self-guided training ended
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def structured(self, x: torch.Tensor) -> torch.Tensor:
        if self.structure == "lowrank":
            return self.up(self.down(x))
        if self.structure == "block_dense":
            return block_diagonal_multiply(x, self.blkdiag1) @ self.blkdiag2.T
        return monarch_multiply(x, self.blkdiag1, self.blkdiag2)

    def structured_weight(self) -> torch.Tensor:
        if self.structure == "lowrank":
            return self.up.weight @ self.down.weight
        if self.structure == "block_dense":
            return self.blkdiag2 @ torch.block_diag(*self.blkdiag1.unbind(0))
        return monarch_dense(self.blkdiag1, self.blkdiag2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.structured(x)
        if self.guide is not None:
            ratio = self.guide_ratio.to(out.dtype)
            out = ratio * self.guide(x) + (1 - ratio) * out
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> torch.Tensor:
        weight = self.structured_weight()
        if self.guide is None:
            return weight
        ratio = self.guide_ratio.to(weight.dtype)
        return ratio * self.guide.weight + (1 - ratio) * weight

    def drop_guide(self, optimizer: Any) -> None:
        """End self-guided training: remove the guide from the layer and from the optimizer."""
        if self.guide is None:
            return
        weight = self.guide.weight
        if optimizer is not None:
            optimizer.state.pop(weight, None)
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not weight]
        self.guide = None
        self.guide_ratio.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, structure={self.structure}, guided={self.guide is not None}"


@PARAMETRISATIONS.register(
    "structured_ffn",
    family="block_structured",
    paper="Building on Efficient Foundations: Effectively Training LLMs with Structured Feedforward Layers",
    arxiv="2406.16450",
)
class StructuredFFN(Parametrisation):
    """Low-rank / BlockDense / BlockShuffle FFN weights with self-guided training (module docstring)."""

    default_targets = FFN_TARGETS
    OPTIONS = {
        "structure": Option("lowrank", str, choices=STRUCTURES, help="the structured form of each FFN weight"),
        "nblocks": Option(None, int, low=1, nullable=True,
                          help="blocks of block_dense / block_shuffle; None = the release's 4 / 2"),
        "guided_fraction": Option(0.5, float, low=0, high=1,
                                  help="fraction of the run trained with the dense guide (self-guided training); "
                                       "0 = off"),
        "guide_schedule": Option("cosine", str, choices=("cosine", "linear"),
                                 help="decay of the guide's weight alpha from 1 to 0"),
        "seed": Option(None, int, nullable=True, help="seed of the block factors' draw; None = torch's global RNG"),
    }

    def __init__(self, rank: int | None = None, **options: Any) -> None:
        super().__init__(rank, **options)
        seed = self.options["seed"]
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        structure = self.options["structure"]
        if structure == "lowrank" and self.options["nblocks"] is not None:
            raise RankwiseError(f"{self.owner}: structure 'lowrank' has no blocks; drop nblocks")
        self.nblocks = self.options["nblocks"] or DEFAULT_NBLOCKS.get(structure)

    def needs_rank(self) -> bool:
        return self.options["structure"] != "block_shuffle"

    def check(self, layer: DenseLayer) -> None:
        super().check(layer)
        structure = self.options["structure"]
        if structure == "block_shuffle":
            monarch_shapes(layer.out_features, layer.in_features, self.nblocks)
        elif structure == "block_dense" and (layer.in_features % self.nblocks or self.rank % self.nblocks):
            raise RankwiseError(
                f"block_dense splits {layer.name}'s {layer.in_features} inputs and the rank {self.rank} into "
                f"{self.nblocks} blocks; choose nblocks dividing both (or another rank)"
            )

    def layer_types(self) -> tuple[type, ...]:
        return (StructuredLinear,)

    def _orthogonal(self, *shape: int) -> torch.Tensor:
        return polar_factor(torch.randn(*shape, generator=self.generator))

    def build(self, layer: DenseLayer) -> StructuredLinear:
        structure, b = self.options["structure"], self.nblocks
        if structure == "lowrank":
            u, s, vh = svd(layer.weight)
            up, down = split_singular_values(u[:, :self.rank], s[:self.rank], vh[:self.rank])
            factors = {"up": up, "down": down}
        elif structure == "block_dense":
            blocks = torch.stack([self._orthogonal(self.rank // b, layer.in_features // b) for _ in range(b)])
            factors = {"w1": blocks, "w2": self._orthogonal(layer.out_features, self.rank)}
        else:
            w1_shape, w2_shape = monarch_shapes(layer.out_features, layer.in_features, b)
            factors = {"w1": torch.stack([self._orthogonal(*w1_shape[1:]) for _ in range(b)]),
                       "w2": torch.stack([self._orthogonal(*w2_shape[1:]) for _ in range(b)])}
        return StructuredLinear(layer, structure, factors, guided=self.options["guided_fraction"] > 0)

    def guide_ratio(self, step: int, total_steps: int) -> float:
        """``alpha_t`` after ``step`` of ``total_steps`` (0 once self-guided training is over)."""
        guided = round(self.options["guided_fraction"] * total_steps)
        if step >= guided:
            return 0.0
        progress = step / guided
        if self.options["guide_schedule"] == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def after_step(self, model: nn.Module, *, step: int, total_steps: int, optimizer: Any) -> None:
        ratio = self.guide_ratio(step, total_steps)
        for layer in self.layers(model).values():
            if layer.guide is None:
                continue
            if ratio == 0.0:
                layer.drop_guide(optimizer)
            else:
                layer.guide_ratio.fill_(ratio)
