"""Compacter: a bottleneck of low-rank hypercomplex (Kronecker-sum) layers with slow weights shared
by every layer.

Karimi Mahabadi, Henderson and Ruder 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers", arXiv 2106.04647.

A low-rank parameterized hypercomplex multiplication (LPHM) layer of shape ``p x q`` is

    LPHM(A, s, t) = sum_{i=1..n} A_i (x) (s_i t_i^T)      A_i: n x n,  s_i: p/n,  t_i: q/n

with the "slow" weights ``A`` (``n x n x n``) shared by all layers of one ``adapt`` call and the
"fast" rank-one weights ``s_i t_i^T`` per layer. Compacter's adapter is a bottleneck of two of
them, down to ``r`` (``rank``) and back up; here it runs in parallel with each targeted layer::

    dW = s * U D      U = LPHM(A, u, v): out x r,   D = LPHM(A, p, q): r x in,   s = alpha / r

Init: ``A`` (shared) and the down projection's fast weights Glorot-uniform as in the paper's code,
the up projection's ``u_i = 0`` (the update is zero at init; ``v_i`` Glorot-uniform).
Parameters: ``n^3`` once, plus ``n (out/n + r/n) + n (r/n + in/n) = out + in + 2 r`` per layer.
``n`` (``phm_dim``, default 4, the paper's) must divide ``out``, ``in`` and ``r``.

Deviations: the paper inserts the bottleneck after the attention and feed-forward blocks with a
GeLU between the two LPHM layers; here the bottleneck is linear and parallel to each targeted
layer, so the update is a weight update that merges into the base (``dW = s U D`` has rank <= r,
and ``(s U, D)`` are its exact LoRA factors for the export). The forward applies ``D`` and ``U``
through :func:`~rankwise.adapters.kronecker_family.kron_apply`, term by term, never forming them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE, AdapterLayer
from rankwise.adapters.kronecker_family import kron_apply
from rankwise.layers import compute_dtype
from rankwise.options import Option

PHM_DIM = Option(4, int, low=1, help="n: number of Kronecker terms and size of the shared slow weights A (n x n x n)")


def lphm(slow: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``sum_i A_i (x) (s_i t_i^T)`` for ``A`` (n x n x n), ``s`` (n x p/n), ``t`` (n x q/n)."""
    fast = left[:, :, None] * right[:, None, :]
    return sum(torch.kron(slow[i], fast[i]) for i in range(slow.shape[0]))


def lphm_apply(x: torch.Tensor, slow: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x LPHM(A, s, t)^T`` without forming the layer: one Kronecker application per term."""
    fast = left[:, :, None] * right[:, None, :]
    return sum(kron_apply(x, slow[i], fast[i]) for i in range(slow.shape[0]))


@ADAPTERS.register(
    "compacter",
    family="kronecker",
    paper="Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
    arxiv="2106.04647",
    supports=LINEAR_LIKE,
)
class CompacterLayer(AdapterLayer):
    """``s * LPHM(A, u, v) LPHM(A, p, q)`` with ``A`` shared by all layers, ``u, v, p, q`` per layer."""

    OPTIONS = {"phm_dim": PHM_DIM}

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Module], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
        n = options.get("phm_dim", PHM_DIM.default)
        first = next(iter(bases.values()))
        slow = torch.empty(n, n, n, device=first.weight.device, dtype=compute_dtype(first))
        nn.init.xavier_uniform_(slow)
        return {"phm_rule": nn.Parameter(slow)}

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        n = self.options["phm_dim"]
        if self.out_features % n or self.in_features % n or self.rank % n:
            raise self.error(
                f"phm_dim n={n} must divide out_features={self.out_features}, in_features={self.in_features} and "
                f"the rank r={self.rank}; choose a rank that is a multiple of n and an n dividing both dimensions"
            )
        self.scaling = self.alpha / self.rank
        self.phm_rule = self.shared["phm_rule"]
        for name, size in (("up_left", self.out_features), ("up_right", self.rank),
                           ("down_left", self.rank), ("down_right", self.in_features)):
            setattr(self, name, nn.Parameter(torch.empty(n, size // n, **self.factory)))

    def initialize(self, stats: Any = None) -> None:
        with torch.no_grad():
            for factor in (self.up_right, self.down_left, self.down_right):
                nn.init.xavier_uniform_(factor)
            nn.init.zeros_(self.up_left)

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, D)``: the up (out x r) and down (r x in) LPHM layers."""
        return (lphm(self.phm_rule, self.up_left, self.up_right),
                lphm(self.phm_rule, self.down_left, self.down_right))

    def delta_weight(self) -> torch.Tensor:
        up, down = self.projections()
        return self.scaling * (up @ down)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = lphm_apply(x.to(self.down_left.dtype), self.phm_rule, self.down_left, self.down_right)
        return self.scaling * lphm_apply(hidden, self.phm_rule, self.up_left, self.up_right)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.projections()
        return self.scaling * up.detach().float(), down.detach().float()
