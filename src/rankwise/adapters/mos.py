"""MoS: LoRA factors assembled from shards of trainable pools shared across layers (Mixture of Shards).

Wang, Chen, Chen, Dong, Xue, Jiang, Kong & Wu 2025, "MoS: Unleashing Parameter Efficiency of
Low-Rank Adaptation with Mixture of Shards", arXiv 2410.00938 (ICLR 2025).

Each adapted layer is a LoRA ``h = W x + s B A x`` (``A``: ``r x in``, ``B``: ``out x r``,
``s = alpha / r``) whose rows of ``A`` and columns of ``B`` are not its own parameters: they are
concatenations of shards retrieved from global pools by a fixed random index (the paper's
MoE-like router). The pools hold the parameter budget of a LoRA of rank ``r_e``
(``equivalent_rank``) on every layer, so a layer trains ``r_e (in + out)`` parameters' worth
while its update has rank ``r > r_e``. The paper's four differentiation strategies, each an option:

- vector sharding (``shards = l``): every rank vector is ``l`` shards of length ``ceil(in / l)``
  (``ceil(out / l)`` for ``B``), concatenated and cut to length; ``l = 1`` retrieves whole vectors;
- shard privatization (``private_rank = p``): the first ``p`` rank vectors of each layer are its
  own (private) shards; the other ``r - p`` come from the public pool, which holds
  ``L (r_e - p) l`` shards for the ``L`` layers that share it;
- subset selection (``subset_selection``): each layer retrieves its ``(r - p) l`` public shards
  through its own random index (a random subset of the pool, each shard at most
  ``ceil((r - p) l / pool)`` times); off, every layer of a pool retrieves the same shards (pure sharing);
- pair dissociation (``pair_dissociation``): ``A`` and ``B`` shards are indexed independently
  (separate pools, separate indices); off, the ``k``-th slot of ``A`` and of ``B`` take the same
  pool position, so rank-one pairs stay tied.

Trainable parameters: ``r_e l (ceil(in / l) + ceil(out / l))`` per layer (``r_e (in + out)`` when
``l`` divides both), counted in the shared pools and the private shards. Init as LoRA: ``A``
shards ``U(-1/sqrt(in), 1/sqrt(in))``, ``B`` shards zero (the model equals the base at init).

Pools are shared by the layers of one weight shape (``out x in``): a shard's length is fixed by
the shape (the paper shares per projection type; for a LLaMA these groups coincide except that
same-shaped types also share). The index maps are regenerated from ``seed`` on the CPU over the
layers in name order (:mod:`~rankwise.adapters.random_basis_family`) and not saved: the adapter
file holds the pools and private shards only. The update is exactly rank-``r`` factored, so the
PEFT export (PEFT has no MoS) is an exact LoRA.

Deviation: the authors' release also offers a random scaling of the retrieved shards
(``init_lora_A_vec_value`` / ``init_norm_std``), which is not among the four strategies and is
not offered here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.random_basis_family import GeneratedLoraLayer, layer_key, seeded_generator, shared_factory
from rankwise.layers import features
from rankwise.options import Option


def shard_length(dimension: int, shards: int) -> int:
    return -(-dimension // shards)


def spread_choice(count: int, pool: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices into ``pool`` items: random permutations of the pool, concatenated, so every
    item is taken at most ``ceil(count / pool)`` times."""
    rounds = -(-count // pool)
    return torch.cat([torch.randperm(pool, generator=generator) for _ in range(rounds)])[:count]


@ADAPTERS.register(
    "mos",
    family="random_basis",
    paper="MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards",
    arxiv="2410.00938",
    supports=LINEAR_LIKE,
)
class MosLayer(GeneratedLoraLayer):
    """``base(x) + s B A x`` with ``A``'s rows and ``B``'s columns concatenated from shared and private shards."""

    OPTIONS = {
        "equivalent_rank": Option(None, int, low=1, nullable=True,
                                  help="r_e: the pools hold a rank-r_e LoRA's parameters per layer; None = max(1, rank // 8)"),
        "private_rank": Option(None, int, low=0, nullable=True,
                               help="p: rank vectors private to each layer (shard privatization); None = r_e // 2"),
        "shards": Option(2, int, low=1, help="l: shards per rank vector (vector sharding; 1 = whole vectors)"),
        "subset_selection": Option(True, bool, help="each layer retrieves its own random subset of the public pool"),
        "pair_dissociation": Option(True, bool, help="A and B shards indexed independently (False: pairs tied)"),
    }

    @staticmethod
    def budget(rank: int, options: dict[str, Any]) -> tuple[int, int]:
        """``(r_e, p)`` with their defaults applied."""
        equivalent = options["equivalent_rank"] or max(1, rank // 8)
        private = equivalent // 2 if options["private_rank"] is None else options["private_rank"]
        return equivalent, private

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Module], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per weight shape, the public pools of ``A`` and ``B`` shards (trainable) and, per layer, its indices."""
        equivalent, private = cls.budget(rank, options)
        shards = options["shards"]
        factory = shared_factory(bases)
        groups: dict[tuple[int, int], list[str]] = {}
        for name in sorted(bases):
            groups.setdefault(features(bases[name]), []).append(name)
        generator = seeded_generator(options["seed"])
        shared: dict[str, torch.Tensor] = {}
        slots = (rank - private) * shards
        for (out_features, in_features), names in groups.items():
            pool = len(names) * (equivalent - private) * shards
            if slots <= 0 or pool <= 0:
                continue  # no public part (plain LoRA), or a budget __init__ refuses naming the layer
            key = f"{out_features}x{in_features}"
            bound = 1.0 / math.sqrt(in_features)
            shared[f"pool_A/{key}"] = nn.Parameter(
                torch.empty(pool, shard_length(in_features, shards), **factory).uniform_(-bound, bound))
            shared[f"pool_B/{key}"] = nn.Parameter(torch.zeros(pool, shard_length(out_features, shards), **factory))
            indices = None
            for name in names:
                if options["subset_selection"] or indices is None:
                    index_a = spread_choice(slots, pool, generator)
                    index_b = spread_choice(slots, pool, generator) if options["pair_dissociation"] else index_a
                    indices = index_a, index_b
                index_a, index_b = indices
                shared[layer_key(name, "index_A")] = index_a.to(factory["device"])
                shared[layer_key(name, "index_B")] = index_b.to(factory["device"])
        return shared

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        equivalent, private = self.budget(self.rank, self.options)
        if equivalent > self.rank:
            raise self.error(f"equivalent_rank={equivalent} exceeds rank={self.rank}: the pools would hold more than "
                             "the layers use; choose equivalent_rank <= rank")
        if private > equivalent or (private == equivalent and private < self.rank):
            raise self.error(f"private_rank={private} leaves no public pool for equivalent_rank={equivalent} and "
                             f"rank={self.rank}; choose private_rank < equivalent_rank (or all three equal: plain LoRA)")
        self.scaling = self.alpha / self.rank
        self.private = private
        shards = self.options["shards"]
        self.shard_in, self.shard_out = shard_length(self.in_features, shards), shard_length(self.out_features, shards)
        key = f"{self.out_features}x{self.in_features}"
        if private < self.rank:
            self.pool_A = self.shared[f"pool_A/{key}"]
            self.pool_B = self.shared[f"pool_B/{key}"]
            self.frozen("index_A", self.own_key("index_A"))
            self.frozen("index_B", self.own_key("index_B"))
        self.private_A = nn.Parameter(torch.empty(private * shards, self.shard_in, **self.factory))
        self.private_B = nn.Parameter(torch.empty(private * shards, self.shard_out, **self.factory))

    def initialize(self, stats: Any = None) -> None:
        """LoRA's init for the private shards (the public pools are drawn once, in :meth:`make_shared`)."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.private_A.uniform_(-bound, bound)
            self.private_B.zero_()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)``: private shards first, then the retrieved public ones, each rank vector the
        concatenation of its ``l`` shards cut to the layer's dimension."""
        shards_a, shards_b = self.private_A, self.private_B
        if self.private < self.rank:
            shards_a = torch.cat([shards_a, self.pool_A[self.index_A]])
            shards_b = torch.cat([shards_b, self.pool_B[self.index_B]])
        down = shards_a.reshape(self.rank, -1)[:, : self.in_features]
        up = shards_b.reshape(self.rank, -1)[:, : self.out_features].T
        return up, down
