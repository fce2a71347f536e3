"""SLTrain: low-rank factors plus a sparse matrix on a random fixed support.

Han, Li, Huang, Hong, Takeda, Jawanpuria, Mishra, "SLTrain: a sparse plus low-rank approach
for parameter and memory efficient pretraining", arXiv 2406.02214. Each targeted
``out x in`` (``m x n``) layer becomes

    y = x (s B A + S)^T + b,   s = alpha / r,   S = scatter(values, support) (m x n, sparse),

with ``B`` (``m x r``), ``A`` (``r x n``) and the ``nnz = floor(delta m n)`` non-zero values of
``S`` trained; the support (flat indices of ``S``'s non-zeros) is drawn once, uniformly without
replacement, and never changes. Trainable weights per layer: ``r (m + n) + floor(delta m n)``,
the paper's count; the optimizer state is Adam's two moments of exactly those.

Memory (the paper's Sec. 3.3): no dense ``m x n`` tensor is stored for the sparse part. The
layer's forward and backward are one ``autograd.Function`` (:class:`SparsePlusLowRank`)
that forms ``W = s B A + S`` transiently, computes ``y = x W^T`` and saves only ``x``, ``B``,
``A``, the values and the support for backward, where ``W`` is formed again:

    dx = dy W,   G = dy^T x,   dB = s G A^T,   dA = s B^T G,   dvalues = G[support].

The support is stored as a seed: the persistent buffer ``support_seed`` is what the state
dict holds, and the ``int64`` flat indices (``nnz`` of them, a non-persistent buffer) are
regenerated from it when the layer is built or loaded. Seeds come from option ``seed`` (each
layer gets ``seed`` + its position) or, when None, from torch's global RNG.

Defaults follow the authors' release (github.com/andyjm3/SLTrain, 60M script): density
``delta`` 0.03, ``alpha`` 32, ``A`` Kaiming-uniform (bound ``1 / sqrt(n)``), ``B = 0``, values
uniform in ``[-1/sqrt(n), 1/sqrt(n)]``, ``nnz = floor(delta m n)``. Deviations: the release keeps
the support itself as a buffer (in the checkpoint) and runs a C++ extension for the same
forward / backward. Options ``refactor_every`` / ``momentum_reset_every`` add arXiv
2505.22922's refactorisation and momentum reset (:mod:`rankwise.pretrain.refactor`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.options import Option
from rankwise.pretrain.core import PARAMETRISATIONS, DenseLayer, ParametrisedLayer, bias_parameter
from rankwise.pretrain.refactor import REFACTOR_OPTIONS, RefactorHooks


def random_support(m: int, n: int, nnz: int, seed: int, device: torch.device) -> torch.Tensor:
    """``nnz`` sorted distinct flat indices of an ``m x n`` matrix, uniform without replacement, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(m * n, generator=generator)[:nnz].sort().values.to(device)


def _dense(up: torch.Tensor, down: torch.Tensor, scale: float, values: torch.Tensor,
           support: torch.Tensor) -> torch.Tensor:
    weight = (up @ down) * scale
    weight.view(-1).index_add_(0, support, values.to(weight.dtype))
    return weight


class SparsePlusLowRank(torch.autograd.Function):
    """``y = x (s B A + S)^T`` that saves no dense ``m x n`` tensor for backward (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, values: torch.Tensor,
                support: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, up, down, values, support)
        ctx.scale = scale
        return x @ _dense(up, down, scale, values, support).T

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, up, down, values, support = ctx.saved_tensors
        scale = ctx.scale
        needs_x, needs_up, needs_down, needs_values = ctx.needs_input_grad[:4]
        grad_x = grad_out @ _dense(up, down, scale, values, support) if needs_x else None
        grad_up = grad_down = grad_values = None
        if needs_up or needs_down or needs_values:
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            if needs_up:
                grad_up = scale * (grad_weight @ down.T)
            if needs_down:
                grad_down = scale * (up.T @ grad_weight)
            if needs_values:
                grad_values = grad_weight.view(-1)[support].to(values.dtype)
        return grad_x, grad_up, grad_down, grad_values, None, None


class SLTrainLinear(ParametrisedLayer, nn.Module):
    """``y = x (s B A + S)^T + b``: factors ``up`` (B) / ``down`` (A) and ``values`` on a seeded support."""

    def __init__(self, layer: DenseLayer, rank: int, alpha: float, density: float, seed: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, rank
        self.scaling = alpha / rank
        self.nnz = int(density * layer.out_features * layer.in_features)
        like = {"device": layer.device, "dtype": layer.dtype}
        self.down = nn.Linear(layer.in_features, rank, bias=False, **like)
        self.up = nn.Linear(rank, layer.out_features, bias=False, **like)
        self.values = nn.Parameter(torch.empty(self.nnz, **like))
        self.bias = bias_parameter(layer)
        self.register_buffer("support_seed", torch.tensor(seed, dtype=torch.int64, device=layer.device))
        self.register_buffer("support", self._draw_support(), persistent=False)

    def _draw_support(self) -> torch.Tensor:
        return random_support(self.out_features, self.in_features, self.nnz, int(self.support_seed),
                              self.support_seed.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.support = self._draw_support()  # the support follows the loaded seed

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        """The release's init: ``A`` and the values uniform in ``[-1/sqrt(n), 1/sqrt(n)]``, ``B = 0``."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            for tensor in (self.down.weight, self.values):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (2 * bound) - bound)
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = SparsePlusLowRank.apply(x, self.up.weight, self.down.weight, self.values, self.support, self.scaling)
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> torch.Tensor:
        return _dense(self.up.weight, self.down.weight, self.scaling, self.values, self.support)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, nnz={self.nnz}, scaling={self.scaling:g}"


@PARAMETRISATIONS.register(
    "sltrain",
    family="sparse_lowrank",
    paper="SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining",
    arxiv="2406.02214",
)
class SLTrain(RefactorHooks):
    """``W = (alpha / r) B A + S`` with ``S`` on a random fixed support (module docstring)."""

    zero_factor_at_init = True  # B = 0, as LoRA
    OPTIONS = {
        "density": Option(0.03, float, low=0, high=1, low_open=True, high_open=True,
                          help="fraction delta of the m x n entries in the sparse part's fixed support"),
        "alpha": Option(32.0, float, low=0, low_open=True, help="scale numerator: the low-rank part is (alpha/r) B A"),
        "seed": Option(None, int, nullable=True,
                       help="seed of the supports and the init (layer i uses seed + i); None = torch's global RNG"),
        **REFACTOR_OPTIONS,
    }

    def __init__(self, rank: int | None = None, **options: Any) -> None:
        super().__init__(rank, **options)
        seed = self.options["seed"]
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self._built = 0

    def check(self, layer: DenseLayer) -> None:
        super().check(layer)
        if int(self.options["density"] * layer.out_features * layer.in_features) < 1:
            raise RankwiseError(
                f"density {self.options['density']} leaves no sparse entry in {layer.name} "
                f"({layer.out_features} x {layer.in_features}); raise density or leave that layer out of targets"
            )

    def layer_types(self) -> tuple[type, ...]:
        return (SLTrainLinear,)

    def factor_pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        return [(layer.up.weight, layer.down.weight, [p for p in layer.parameters() if p.requires_grad])
                for layer in self.layers(model).values()]

    def build(self, layer: DenseLayer) -> SLTrainLinear:
        seed = self.options["seed"]
        support_seed = seed + self._built if seed is not None else int(torch.randint(0, 2**62, ()))
        self._built += 1
        module = SLTrainLinear(layer, self.rank, self.options["alpha"], self.options["density"], support_seed)
        module.reset_parameters(self.generator)
        return module
