"""LOST: an SVD-initialised low-rank part plus channel-wise sparse components.

Li, Yin, Shen, Xu, Xu, Huang, Wang, Liu, Wang, "LOST: Low-rank and Sparse Pre-training for
Large Language Models", arXiv 2508.02668. The fresh dense weight ``W0`` (``m x n``) is split by
its SVD ``W0 = U diag(S) V^T`` into complementary parts:

* the dominant low-rank part, ``B = U_r diag(sqrt S_r)``, ``A = diag(sqrt S_r) V_r^T`` (the top
  ``r`` singular triplets, balanced);
* channel-wise sparse components built from the remaining singular values,
  ``R = U_{>r} diag(S_{>r}) V_{>r}^T = W0 - B A``: the ``c = max(1, round(channel_density n))``
  input channels (columns) of ``R`` with the largest l2 norm are kept as the trainable
  ``m x c`` matrix ``C`` on the fixed channel set ``J``;

and the layer computes

    y = B (A x) + C x_J + b,

with ``B``, ``A`` and ``C`` trained: ``r (m + n) + m c`` weights per layer. The channel set is a
persistent buffer (it depends on the init, so a checkpoint carries it).

What was and was not checked: the paper's abstract and summaries fix the construction above
(SVD split, dominant part low rank, channel-wise sparse part from the residual singular
values). The authors' code (github.com/JiaxiLi1/LOST-Low-rank-and-Sparse-Training-for-Large-
Language-Models) could not be read here, so its defaults are not verified: the channel axis
(input columns), the selection score (column l2 norm of the residual), the density default
(0.05) and the absence of a mixing weight between the two parts are our choices. Options
``refactor_every`` / ``momentum_reset_every`` add arXiv 2505.22922's refactorisation and
momentum reset of ``B``, ``A`` (:mod:`rankwise.pretrain.refactor`).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import svd
from rankwise.options import Option
from rankwise.pretrain.core import PARAMETRISATIONS, DenseLayer, ParametrisedLayer, bias_parameter
from rankwise.pretrain.refactor import REFACTOR_OPTIONS, RefactorHooks


class LOSTLinear(ParametrisedLayer, nn.Module):
    """``y = up(down(x)) + C x[..., channels] + b``."""

    def __init__(self, layer: DenseLayer, up: torch.Tensor, down: torch.Tensor, columns: torch.Tensor,
                 channels: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = layer.in_features, layer.out_features, up.shape[1]
        like = {"device": layer.device, "dtype": layer.dtype}
        self.down = nn.Linear(layer.in_features, self.rank, bias=False, **like)
        self.up = nn.Linear(self.rank, layer.out_features, bias=False, **like)
        self.sparse = nn.Linear(channels.numel(), layer.out_features, bias=False, **like)
        self.bias = bias_parameter(layer)
        self.register_buffer("channels", channels.to(layer.device))
        with torch.no_grad():
            self.up.weight.copy_(up)
            self.down.weight.copy_(down)
            self.sparse.weight.copy_(columns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.up(self.down(x)) + self.sparse(x.index_select(-1, self.channels))
        return out if self.bias is None else out + self.bias

    def dense_weight(self) -> torch.Tensor:
        weight = self.up.weight @ self.down.weight
        return weight.index_add(1, self.channels, self.sparse.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, channels={self.channels.numel()}"


@PARAMETRISATIONS.register(
    "lost",
    family="sparse_lowrank",
    paper="LOST: Low-rank and Sparse Pre-training for Large Language Models",
    arxiv="2508.02668",
)
class LOST(RefactorHooks):
    """Top-``r`` SVD part of the dense init plus its residual's strongest input channels (module docstring)."""

    OPTIONS = {
        "channel_density": Option(0.05, float, low=0, high=1, low_open=True,
                                  help="fraction of the input channels whose residual columns form the sparse part"),
        **REFACTOR_OPTIONS,
    }

    def layer_types(self) -> tuple[type, ...]:
        return (LOSTLinear,)

    def factor_pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]:
        return [(layer.up.weight, layer.down.weight, [p for p in layer.parameters() if p.requires_grad])
                for layer in self.layers(model).values()]

    def channel_count(self, in_features: int) -> int:
        return max(1, round(self.options["channel_density"] * in_features))

    def build(self, layer: DenseLayer) -> LOSTLinear:
        u, s, vh = svd(layer.weight)
        r = self.rank
        up, down = split_singular_values(u[:, :r], s[:r], vh[:r])
        residual = (u[:, r:] * s[r:]) @ vh[r:]
        count = self.channel_count(layer.in_features)
        channels = residual.norm(dim=0).topk(count).indices.sort().values
        return LOSTLinear(layer, up, down, residual[:, channels], channels)
