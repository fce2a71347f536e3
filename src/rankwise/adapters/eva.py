"""EVA: explained variance adaptation.

Paischer, Hauzenberger, Schmied, Alkin, Deisenroth & Hochreiter 2024, "One Initialization
to Rule them All: Fine-tuning via Explained Variance Adaptation", arXiv 2410.07170.

LoRA (``W + s B A``) whose ``A`` holds the principal directions of the layer's INPUT
activations on the fine-tuning data, and ``B = 0`` (so the output at init equals the base):

1. Incremental SVD. Each data batch is run through the unmodified model; every adapted
   layer's input rows ``X_b`` (tokens x in; padding positions -- ``attention_mask == 0`` --
   and, with ``use_label_mask``, positions whose label equals ``label_mask_value`` are
   dropped) update an incremental PCA (:mod:`rankwise.linalg.incremental_pca`) of
   ``k = round(rho * r)`` components. A layer has converged when each of the components it is
   currently allotted has cosine similarity ``>= tau`` with its estimate from the previous
   batch; converged layers are no longer fed, and the pass stops when all have converged or
   the batches run out. A layer that sees fewer rows in a batch than it has components (BERT's
   ``pooler.dense`` sees one row per sequence) pools its rows across batches until it has
   enough for one update; if the whole data set has too few, ``adapt`` refuses.
2. Rank redistribution by explained variance. The explained-variance ratios of all layers'
   ``k`` components are ranked globally and the top ``budget = r * n_layers`` are kept; layer
   ``l`` gets as many components as it has among them, so ``r_l <= rho * r`` (``rho = 1``:
   every layer gets ``r``, no redistribution).
3. Init: ``A_l = V_l[:r_l]`` (the top right singular vectors; ``whiten=True`` divides each by
   the square root of its singular value, PEFT's semantics), ``B_l = 0``. With
   ``adjust_scaling_factors=True`` the layer's alpha becomes ``alpha * r_l / r`` so the scaling
   ``alpha / r`` -- and the gradient scale -- is the same for every layer whatever its rank.

Option names and defaults follow PEFT's ``EvaConfig`` (rho=2, tau=0.99, use_label_mask,
label_mask_value=-100, whiten, adjust_scaling_factors).

Deviations:
- every adapted layer keeps at least rank 1 (its top component is granted first, the rest of
  the budget is redistributed): the adapter framework cannot leave a targeted layer out,
  while the paper (and PEFT) may give a layer rank 0 and drop its adapter;
- the batches are passed once; PEFT cycles the data until all layers converge;
- the PCA is exact per step by default (PEFT always uses a randomized low-rank SVD inside its
  incremental PCA); option ``niter`` (as PiSSA's) takes each step's top ``k`` components by a
  randomized SVD with that many power iterations and oversampling 10 instead.

Init cost: each step is one SVD of the ``(k + m + 1) x in`` stacked matrix per layer. Layers
that see identical inputs (q / k / v) get identical PCA states, so they are grouped (their row
blocks compared exactly, batch by batch) and each group's update runs once -- the same
components as one PCA per layer, as PEFT's sharing of equal inputs. EVA leaves the base weight
as it is (``B = 0``), so ``init_report`` has no residual error for it, and its time is that of
the data pass, outside ``init_report``'s per-layer seconds.

The pass runs when the per-layer ranks are allocated (``allocate_ranks``), because the number
of components ``round(rho * r)`` depends on the rank, which ``collect_statistics`` is not given.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.lora_family import StandardLoraLayer
from rankwise.calibration import LayerStatistics, collect_layer_inputs
from rankwise.common_options import NITER
from rankwise.errors import RankwiseError
from rankwise.layers import features
from rankwise.linalg.incremental_pca import IncrementalPCA
from rankwise.options import Option


def _token_mask(batch: Any, use_label_mask: bool, label_mask_value: int) -> torch.Tensor | None:
    """Flattened boolean mask of the token positions to use (None: use every row)."""
    if not isinstance(batch, dict) or not torch.is_tensor(batch.get("input_ids")):
        return None
    ids = batch["input_ids"]
    mask = torch.ones_like(ids, dtype=torch.bool)
    attention = batch.get("attention_mask")
    if torch.is_tensor(attention) and attention.shape == ids.shape:
        mask &= attention.bool()
    labels = batch.get("labels")
    if use_label_mask and torch.is_tensor(labels) and labels.shape == ids.shape:
        mask &= labels != label_mask_value
    return mask.reshape(-1)


class _MaskedRows:
    """Reducer keeping one batch's input rows of a layer, restricted to the token mask."""

    def __init__(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self.rows: list[torch.Tensor] = []

    def update(self, rows: torch.Tensor) -> None:
        if self.mask is not None and self.mask.numel() == rows.shape[0]:
            rows = rows[self.mask.to(rows.device)]
        self.rows.append(rows.to(torch.float32))


def redistribute_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """Give each layer one rank, then the remaining budget to the globally largest ratios.

    ``ratios[name]`` holds the layer's explained-variance ratios in decreasing order; a
    layer can receive at most ``len(ratios[name])`` ranks.
    """
    ranks = {name: 1 for name in ratios}
    candidates = [(float(value), name) for name, values in ratios.items() for value in values[1:]]
    candidates.sort(key=lambda item: -item[0])  # stable: ties keep layer order
    for _, name in candidates[: max(budget - len(ratios), 0)]:
        ranks[name] += 1
    return ranks


def _twins(
    blocks: dict[str, torch.Tensor], pcas: dict[str, IncrementalPCA], history: dict[str, int]
) -> list[list[str]]:
    """The layers of ``blocks`` grouped so that each group holds identical PCA states and receives
    identical rows (q / k / v see the same inputs): one update per group gives every member's."""
    groups: dict[tuple, list[list[str]]] = {}
    for name, block in blocks.items():
        candidates = groups.setdefault((history[name], pcas[name].n_components, tuple(block.shape)), [])
        twin = next((group for group in candidates if torch.equal(blocks[group[0]], block)), None)
        if twin is None:
            candidates.append([name])
        else:
            twin.append(name)
    return [group for candidates in groups.values() for group in candidates]


class _EvaPass:
    """The incremental-SVD pass over the data, run once the rank is known."""

    def __init__(self, model: nn.Module, names: list[str], data: list[Any], options: dict[str, Any]) -> None:
        self.model, self.names, self.data, self.options = model, names, data, options

    def run(self, rank: int, max_components: dict[str, int]) -> tuple[dict[str, IncrementalPCA], dict[str, int]]:
        tau = float(self.options["tau"])
        pcas = {name: IncrementalPCA(k, niter=self.options["niter"]) for name, k in max_components.items()}
        # layers with equal history hold identical PCA states (the same blocks folded in, in order)
        history = {name: 0 for name in self.names}
        next_state = 1
        similarity: dict[str, torch.Tensor | None] = {name: None for name in self.names}
        ranks = dict(max_components)
        converged = {name: False for name in self.names}
        pending: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        seen = {name: 0 for name in self.names}
        for index, batch in enumerate(self.data):
            active = [name for name in self.names if not converged[name]]
            if not active:
                break
            mask = _token_mask(batch, self.options["use_label_mask"], self.options["label_mask_value"])
            # collect_layer_inputs reports a batch the model cannot run as "data batch 0"; renumber it.
            try:
                rows = collect_layer_inputs(self.model, active, [batch], lambda m: _MaskedRows(mask))
            except RankwiseError as exc:
                raise RankwiseError(str(exc).replace("data batch 0", f"data batch {index}", 1)) from exc
            ready: dict[str, torch.Tensor] = {}
            for name in active:
                pending[name].extend(rows[name].rows)
                seen[name] += sum(block.shape[0] for block in rows[name].rows)
                if sum(block.shape[0] for block in pending[name]) < pcas[name].n_components:
                    continue  # too few rows for k components yet (a pooler sees one per sequence): pool on
                ready[name] = torch.cat(pending[name])
                pending[name] = []
            for group in _twins(ready, pcas, history):
                leader = pcas[group[0]]
                previous = leader.components
                leader.update(ready[group[0]])
                history.update({name: next_state for name in group})
                next_state += 1
                for name in group:
                    # a shallow copy is safe: update() assigns new tensors, never writes into the shared ones
                    pcas[name] = leader if name == group[0] else copy.copy(leader)
                    if previous is not None and previous.shape == leader.components.shape:
                        similarity[name] = (previous * leader.components).sum(dim=1).abs()
            if all(p.components is not None for p in pcas.values()):
                ranks = redistribute_ranks(
                    {n: p.explained_variance_ratio() for n, p in pcas.items()}, rank * len(self.names)
                )
            for name in self.names:
                sims = similarity[name]
                converged[name] = sims is not None and bool((sims[: ranks[name]] >= tau).all())
        starved = [name for name, pca in pcas.items() if pca.components is None]
        if starved:
            first = starved[0]
            raise RankwiseError(
                f"eva: the whole data set gives layer {first!r} only {seen[first]} (unmasked) input rows, fewer than "
                f"the {pcas[first].n_components} components it needs ({len(starved)} layer(s) affected); pass more "
                "batches (a pooler sees one row per sequence) or lower rank / rho"
            )
        return pcas, ranks


@ADAPTERS.register(
    "eva",
    family="data_init",
    paper="One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation",
    arxiv="2410.07170",
    supports=LINEAR_LIKE,
)
class EvaLayer(StandardLoraLayer):
    """LoRA with ``A`` = top right singular vectors of the layer's input activations, ``B = 0``."""

    OPTIONS = {
        "rho": Option(2.0, float, low=1, help="components per layer = round(rho * r) (1 = no rank redistribution)"),
        "tau": Option(0.99, float, low=0, high=1, help="cosine similarity at which a component has converged"),
        "use_label_mask": Option(True, bool, help="drop token positions whose label is label_mask_value"),
        "label_mask_value": Option(-100, int, help="the label value of ignored positions"),
        "whiten": Option(False, bool, help="divide each component by the square root of its singular value"),
        "adjust_scaling_factors": Option(
            True, bool, help="layer alpha = alpha * r_l / r, so every layer keeps the requested scaling alpha / r"
        ),
        "niter": NITER,
    }
    statistics = ("input_batches",)  # declares the method data-driven; collection is overridden below

    @classmethod
    def collect_statistics(
        cls, model: nn.Module, names: list[str], data: list[Any], options: dict[str, Any], *, loss_fn: Any = None
    ) -> dict:
        run = _EvaPass(model, names, data, options)
        return {name: LayerStatistics(extra={"eva_pass": run}) for name in names}

    @classmethod
    def allocate_ranks(
        cls, rank: int, bases: dict[str, nn.Module], stats: dict, options: dict[str, Any]
    ) -> dict[str, int]:
        max_components = {
            name: max(1, min(round(options["rho"] * rank), *features(base))) for name, base in bases.items()
        }
        run = next(iter(stats.values())).extra["eva_pass"]
        pcas, ranks = run.run(rank, max_components)
        for name, pca in pcas.items():
            stats[name].extra.update(
                components=pca.components, singular_values=pca.singular_values, requested_rank=rank
            )
        return ranks

    def initialize(self, stats: LayerStatistics | None = None) -> None:
        if stats is None or "components" not in stats.extra:
            raise self.error("no activation components were computed for this layer; pass data=[batch, ...]")
        components = stats.extra["components"][: self.rank]
        if self.options["whiten"]:
            components = components / stats.extra["singular_values"][: self.rank].clamp_min(1e-12).sqrt()[:, None]
        if self.options["adjust_scaling_factors"]:
            self.alpha = self.alpha * self.rank / stats.extra["requested_rank"]
            self.scaling = self.lora_scaling()
        with torch.no_grad():
            self.lora_A.copy_(components.to(self.lora_A.dtype))
            self.lora_B.zero_()
