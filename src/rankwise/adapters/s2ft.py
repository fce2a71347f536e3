"""S2FT: structured sparse fine-tuning of selected channels (heads), trained as one dense block.

Yang, Leng, Guo, Zhao, Nakada, Zhang, Yao & Chen 2024, "S2FT: Efficient, Scalable and
Generalizable LLM Fine-tuning by Structured Sparsity", NeurIPS 2024, arXiv 2412.06289.

S2FT fine-tunes whole channels of a frozen ``out x in`` weight ``W0`` and nothing else. With
``I`` a set of ``k`` selected input channels (option ``axis="in"``, the paper's choice for the
attention output projection -- channels grouped by head -- and the FFN down projection) the
trainable block is the dense ``out x k`` matrix ``D`` and

    h = W0 x + D x_I,       dW[:, I] = D,  dW = 0 elsewhere

(``axis="out"``: ``k`` output channels, ``D`` is ``k x in``, ``dW[I, :] = D``, ``h_I += D x``;
the paper's choice for the value and FFN up projections). ``D = 0`` at init, so the output equals
the base model's. ``k`` is the ``rank``; channels are selected in groups of ``group_size``
(1 = single FFN channels; the head dimension = whole attention heads), ``k / group_size``
groups drawn uniformly at random without replacement (the authors' default selection), from
a generator seeded by option ``seed`` and the layer's module name, so every layer draws its
own set reproducibly. The selected indices (``k`` integers, sorted) are stored with the adapter.
Trainable parameters per layer: ``k out`` (``axis="in"``) or ``k in`` (``axis="out"``).

The gradient of ``D`` is exactly the full fine-tuning gradient of ``W`` restricted to the
selected channels. The update ``dW = D E_I^T`` (``E_I`` the one-hot ``in x k`` selection) is
exactly rank-``k`` factored, so the PEFT export is an exact LoRA of rank ``k``
(:meth:`S2ftLayer.lora_factors`).

Deviations: the authors co-permute adjacent layers (the rows of up/gate before down, the heads
of q/k/v before o) so that the selected channels are contiguous and ``D`` updates a slice of
the weight in place; that permutation leaves the model's function unchanged and only makes
the slice contiguous, so here the selected channels are gathered by index instead (same
function and gradients, no weights permuted). The authors sample the channels over all layers
jointly from one global ratio (layers then get different counts); here every adapted layer
gets ``k`` channels, and the layers it applies to are ``targets`` (the paper's default:
``targets=["o_proj", "down_proj"]`` with ``group_size`` = head dimension for ``o_proj``).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer
from rankwise.options import Option


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and the module name (reproducible, distinct per layer)."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63))


@ADAPTERS.register(
    "s2ft",
    family="sparse",
    paper="S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity",
    arxiv="2412.06289",
    supports=LINEAR_LIKE,
)
class S2ftLayer(AdapterLayer):
    """``W0 x + D x_I``: a dense trainable block on ``k`` selected input (or output) channels."""

    OPTIONS = {
        "axis": Option("in", str, choices=("in", "out"),
                       help="in: train k input channels (o_proj / down_proj); out: k output channels (v / up)"),
        "group_size": Option(1, int, low=1, help="channels per selected group (1 = channels; head dim = heads)"),
        "seed": Option(0, int, low=0, help="seed of the random channel selection (with the module name)"),
    }

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.axis = self.options["axis"]
        group = self.options["group_size"]
        channels = self.in_features if self.axis == "in" else self.out_features
        if channels % group:
            raise self.error(f"group_size={group} does not divide the layer's {channels} {self.axis}put channels; "
                             "pass the head dimension for attention projections or 1 for single channels")
        if self.rank % group or self.rank > channels:
            raise self.error(f"rank={self.rank} must be a multiple of group_size={group} and at most the "
                             f"{channels} {self.axis}put channels (rank counts channels: {self.rank // group or 1} "
                             "groups would be selected)")
        self.channels = channels
        self.register_buffer("s2_indices", torch.zeros(self.rank, dtype=torch.int64, device=self.factory["device"]))
        shape = (self.out_features, self.rank) if self.axis == "in" else (self.rank, self.in_features)
        self.s2_delta = nn.Parameter(torch.empty(shape, **self.factory))

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        return max(in_features, out_features)  # checked against the chosen axis in __init__

    def initialize(self, stats: Any = None) -> None:
        group = self.options["group_size"]
        groups = torch.randperm(self.channels // group, generator=layer_generator(self.options["seed"], self.name))
        chosen = groups[: self.rank // group].sort().values
        indices = (chosen[:, None] * group + torch.arange(group)).flatten()
        with torch.no_grad():
            self.s2_indices.copy_(indices)
            self.s2_delta.zero_()

    def delta_weight(self) -> torch.Tensor:
        update = self.s2_delta.new_zeros(self.out_features, self.in_features)
        if self.axis == "in":
            return update.index_copy(1, self.s2_indices, self.s2_delta)
        return update.index_copy(0, self.s2_indices, self.s2_delta)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.s2_delta.dtype)
        if self.axis == "in":
            return x.index_select(-1, self.s2_indices) @ self.s2_delta.T
        selected = x @ self.s2_delta.T
        return selected.new_zeros(*selected.shape[:-1], self.out_features).index_copy(-1, self.s2_indices, selected)

    def selection(self) -> torch.Tensor:
        """The one-hot selection ``E_I`` (channels x k, fp32): ``dW = D E_I^T`` or ``E_I D``."""
        one_hot = torch.zeros(self.channels, self.rank, device=self.s2_indices.device)
        return one_hot.scatter_(0, self.s2_indices[None, :], 1.0)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D, E_I^T)`` (axis in) or ``(E_I, D)`` (axis out) in fp32: exactly rank ``k``."""
        with torch.no_grad():
            block = self.s2_delta.float()
            if self.axis == "in":
                return block, self.selection().T.contiguous()
            return self.selection(), block
