"""Rank allocation: how the ``ratio`` budget is shared among the targeted layers (family module).

Independent of the factorisation: any per-layer method runs with any allocation
(``compress(..., allocation=...)``). Every allocation returns one kept rank per layer; the
storage rule of :mod:`rankwise.compress.plan` then says how each layer is stored, and the
budget is ``ratio * sum_l m_l n_l`` stored weights.

- ``"uniform"``: ``k_l = max(1, floor(ratio m n / (m + n)))`` -- every layer its share.
- ``"welore"``: WeLore's rule (Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights
  Non-uniformly Emerge from Low-Rank Gradients", arXiv 2407.11239). Per matrix the singular
  values are min-max normalised, ``s_hat = (s - s_min) / (s_max - s_min)``; ONE global
  threshold ``tau`` drops ``p_l = #{s_hat < tau}`` of them (``k_l = min(m, n) - p_l``, at least 1).
  A matrix is a low-rank component (LRC, factorised) when its factors are worth storing (the
  storage rule says ``"factorized"``) and, if ``min_ratio`` is set, ``p_l / min(m, n) >
  min_ratio``; the others (N-LRC) stay untouched. Deviation: the release takes ``tau`` from a
  hand-tuned table per model and target and counts *singular values* (``sum p / sum
  min(m, n)``); here ``tau`` is SEARCHED (the smallest one, over every distinct ``s_hat``) so that
  the stored *weights* meet ``ratio``, and the release's singular-value reduction is
  reported beside it (``allocation_info``). Its ``min_ratio`` default (0.0 when only
  compressing) is replaced by the parameter break-even of each shape, which the storage rule
  already applies (for a square matrix it is the release's fine-tuning value 0.4999).
- ``"sensitivity"``: measured per-layer loss sensitivity. For each layer alone and each
  candidate rank ``k = floor(g m n / (m + n))``, ``g`` in ``SENSITIVITY_GRID`` (those the storage
  rule factorises), the method's own factorisation replaces the weight and the calibration
  objective is measured: the batches' loss (``loss_fn`` or the model's ``.loss``), else, for a
  model without one, ``1 - cos`` between its outputs and the unmodified model's (the last
  hidden state or logits, per token). With ``dL_l(k)`` the increase over the unmodified model
  and ``c_l(k)`` the stored weights (``m n`` for leaving the layer untouched, ``dL = 0``), the
  ranks minimise ``sum_l dL_l(k_l)`` subject to ``sum_l c_l(k_l) <= ratio sum m n`` through the
  Lagrangian ``min sum_l dL_l + lambda c_l``, ``lambda`` found by bisection (the smallest that
  meets the budget). It assumes the layers' losses add up, and costs
  ``layers x |grid| x batches`` forward passes.
- ``"svd_llm_v2"``: SVD-LLM v2's heterogeneous ratio allocation (Wang et al., "SVD-LLM V2:
  Optimizing Singular Value Truncation for Large Language Model Compression", arXiv
  2503.12340, Algorithm 1). The layers are grouped by type (the module name with its layer
  indices replaced: every ``layers.*.self_attn.q_proj`` is one group); for each layer the
  *theoretical truncation loss* ``L_l`` of the method's own factorisation at the uniform rank
  is measured -- the output error ``||(W - W') S||_F = sqrt(tr((W - W') C (W - W')^T))`` on
  the calibration inputs (``C = S S^T``; for SVD-LLM exactly ``sqrt(sum_{i>k} sigma_i^2)`` of
  ``W S``), or the weight error ``||W - W'||_F`` for a data-free method -- and the group's
  compression ratio ``1 - ratio`` is shared as

      R_l = |G| (1 - ratio) (1 / log L_l) / sum_{j in G} (1 / log L_j),
      k_l = max(1, floor((1 - R_l) m n / (m + n))),

  so a layer that loses little when truncated is compressed more; the group's mean
  compression is the uniform one (same shapes: the same stored weights). The rule needs
  ``L > 1`` (``log L > 0``) and is not invariant to the units of ``L``, as published; a group
  with a loss ``<= 1`` (or one layer) keeps the uniform ratio and is listed in
  ``allocation_info["uniform_groups"]``. The v2 code is unreleased (AIoT-MLSys-Lab/SVD-LLM lists
  it as to-do): this follows the paper's Algorithm 1; ``R_l`` is clipped so every layer keeps
  at least rank 1.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from rankwise.calibration import LayerStatistics, run_batch
from rankwise.compress.plan import LayerSpec, kept_parameters, storage_for
from rankwise.compress.statistics import LossFn, batch_loss
from rankwise.compress.whitening import gram_of
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight, layer_kind
from rankwise.linalg.svd import svd

if TYPE_CHECKING:
    from rankwise.compress.core import Compressor

#: fractions of each layer's break-even rank m n / (m + n) the sensitivity allocation tries
SENSITIVITY_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


@dataclass
class AllocationContext:
    """What an allocation may read."""

    model: nn.Module
    specs: list[LayerSpec]
    ratio: float
    keep_dense_above: float | None
    compressor: "Compressor"
    stats: dict[str, LayerStatistics]
    data: list[Any] | None
    loss_fn: LossFn | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> float:
        return self.ratio * sum(spec.parameters for spec in self.specs)


@dataclass
class Allocation:
    ranks: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)


def uniform_rank(spec: LayerSpec, ratio: float) -> int:
    """``max(1, floor(ratio m n / (m + n)))``."""
    return max(1, math.floor(ratio * spec.break_even))


def uniform(context: AllocationContext) -> Allocation:
    for spec in context.specs:
        if context.ratio * spec.parameters < spec.out_features + spec.in_features:
            raise RankwiseError(
                f"ratio {context.ratio} is below what a rank-1 factorisation of {spec.name} "
                f"({spec.out_features} x {spec.in_features}) keeps, (m + n) / (m n) = "
                f"{(spec.out_features + spec.in_features) / spec.parameters:.4g}; raise ratio or leave that layer out of targets"
            )
    return Allocation({spec.name: uniform_rank(spec, context.ratio) for spec in context.specs})


# ----- WeLore ---------------------------------------------------------------------------------


def normalised_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """WeLore's ``(s - s_min) / (s_max - s_min)`` of a matrix's singular values (descending);
    all ones for a flat spectrum (nothing to drop): one whose spread is within the SVD's rounding,
    ``eps s_max max(m, n)`` (computed singular values of an exactly flat spectrum differ by ~1e-15
    relative, and normalising that noise would make it look heavy-tailed)."""
    computed = svd(weight)[1]
    singular_values = computed.to(torch.float64)
    spread = singular_values.max() - singular_values.min()
    rounding = torch.finfo(computed.dtype).eps * singular_values.max() * max(weight.shape[-2:])
    if not spread > rounding:
        return torch.ones_like(singular_values)
    return (singular_values - singular_values.min()) / spread


def welore(context: AllocationContext) -> Allocation:
    min_ratio = context.options.get("min_ratio")
    spectra = {spec.name: normalised_spectrum(dense_weight(context.model.get_submodule(spec.name))).sort().values
               for spec in context.specs}

    def ranks_at(tau: float) -> dict[str, int]:
        ranks = {}
        for spec in context.specs:
            dropped = min(int(torch.searchsorted(spectra[spec.name], tau, side="left")), spec.full_rank - 1)
            rank = spec.full_rank - dropped
            low_rank = storage_for(spec, rank, context.keep_dense_above) == "factorized" and (
                min_ratio is None or dropped / spec.full_rank > min_ratio)
            ranks[spec.name] = rank if low_rank else spec.full_rank
        return ranks

    def stored(ranks: dict[str, int]) -> int:
        return sum(kept_parameters(spec, ranks[spec.name], context.keep_dense_above) for spec in context.specs)

    thresholds = torch.unique(torch.cat(list(spectra.values()))).tolist() + [math.nextafter(1.0, 2.0)]
    if stored(ranks_at(thresholds[-1])) > context.budget:
        raise RankwiseError(
            f"ratio {context.ratio} cannot be met with WeLore's rule: even dropping all but one singular value "
            f"of every low-rank component keeps {stored(ranks_at(thresholds[-1])) / (context.budget / context.ratio):.4f}"
            " of the weights; raise ratio or pass min_ratio=None / keep_dense_above=None")
    low, high = 0, len(thresholds) - 1  # invariant: thresholds[high] meets the budget
    while low < high:
        middle = (low + high) // 2
        if stored(ranks_at(thresholds[middle])) <= context.budget:
            high = middle
        else:
            low = middle + 1
    tau = thresholds[high]
    ranks = ranks_at(tau)
    low_rank = [spec for spec in context.specs if ranks[spec.name] < spec.full_rank]
    reduction = sum(spec.full_rank - ranks[spec.name] for spec in low_rank) / sum(s.full_rank for s in context.specs)
    return Allocation(ranks, {"threshold": tau, "lrc": [s.name for s in low_rank],
                              "singular_value_reduction": reduction})


# ----- measured sensitivity -------------------------------------------------------------------


def _output_tensor(output: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if value is not None:
            return value
    if torch.is_tensor(output):
        return output
    return output[0]


def _objective(context: AllocationContext, reference: list[torch.Tensor] | None) -> float:
    """The calibration objective (see the module docstring), averaged over the batches."""
    total = 0.0
    for index, batch in enumerate(context.data):
        if reference is None:
            total += float(batch_loss(context.model, batch, index, context.loss_fn, "the sensitivity allocation"))
        else:
            out = _output_tensor(run_batch(context.model, batch, index)).float()
            ref = reference[index]
            total += float(1 - torch.nn.functional.cosine_similarity(
                out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1]), dim=-1).mean())
    return total / len(context.data)


def _has_own_loss(context: AllocationContext) -> bool:
    output = run_batch(context.model, context.data[0], 0)
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return context.loss_fn is not None or loss is not None


@contextmanager
def _weight_replaced(layer: nn.Module, matrix: torch.Tensor) -> Iterator[None]:
    """``layer`` applies the ``out x in`` ``matrix`` inside the block, its own weight afterwards."""
    original = layer.weight.data
    stored = matrix.T if layer_kind(layer) == "conv1d" else matrix
    layer.weight.data = stored.to(device=original.device, dtype=original.dtype).contiguous()
    try:
        yield
    finally:
        layer.weight.data = original


def _choose(costs: dict[str, list[tuple[int, int, float]]], multiplier: float) -> dict[str, tuple[int, int, float]]:
    return {name: min(options, key=lambda o: o[2] + multiplier * o[1]) for name, options in costs.items()}


def _fill(options: dict[str, list[tuple[int, int, float]]], chosen: dict[str, tuple[int, int, float]],
          budget: float) -> dict[str, tuple[int, int, float]]:
    """Spend the budget the Lagrangian's discrete choice leaves: repeatedly take the upgrade (a
    larger candidate of one layer) with the largest loss decrease per added weight that still fits."""
    chosen = dict(chosen)
    spare = budget - sum(cost for _, cost, _ in chosen.values())
    while True:
        upgrades = [((now[2] - new[2]) / (new[1] - now[1]), name, new)
                    for name, now in chosen.items() for new in options[name]
                    if new[1] > now[1] and new[2] < now[2] and new[1] - now[1] <= spare]
        if not upgrades:
            return chosen
        _, name, new = max(upgrades)
        spare -= new[1] - chosen[name][1]
        chosen[name] = new


def sensitivity(context: AllocationContext) -> Allocation:
    model = context.model
    was_training = model.training
    model.eval()
    try:
        reference = None if _has_own_loss(context) else [
            _output_tensor(run_batch(model, batch, i)).float() for i, batch in enumerate(context.data)]
        base = _objective(context, reference)
        options: dict[str, list[tuple[int, int, float]]] = {}  # name -> (rank, stored weights, loss increase)
        for spec in context.specs:
            layer = model.get_submodule(spec.name)
            candidates = sorted({max(1, math.floor(g * spec.break_even)) for g in SENSITIVITY_GRID})
            options[spec.name] = [(spec.full_rank, spec.parameters, 0.0)]
            for rank in candidates:
                if storage_for(spec, rank, context.keep_dense_above) != "factorized":
                    continue
                up, down = context.compressor.factorize(spec.name, layer, rank, context.stats.get(spec.name))
                with _weight_replaced(layer, up.double() @ down.double()):
                    increase = _objective(context, reference) - base
                options[spec.name].append((rank, rank * (spec.out_features + spec.in_features), increase))
    finally:
        model.train(was_training)

    def total(choice: dict[str, tuple[int, int, float]]) -> int:
        return sum(cost for _, cost, _ in choice.values())

    cheapest = {name: min(opts, key=lambda o: o[1]) for name, opts in options.items()}
    if total(cheapest) > context.budget:
        raise RankwiseError(
            f"ratio {context.ratio} is below what the sensitivity allocation's smallest candidate ranks "
            f"({SENSITIVITY_GRID[0]} of each layer's break-even rank) keep; raise ratio or use allocation='uniform'")
    low, high = 0.0, 1e-12
    while total(_choose(options, high)) > context.budget:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (low, middle) if total(_choose(options, middle)) <= context.budget else (middle, high)
    chosen = _fill(options, _choose(options, high), context.budget)
    return Allocation(
        {name: rank for name, (rank, _, _) in chosen.items()},
        {"multiplier": high, "base_objective": base,
         "loss_increase": {name: {str(rank): inc for rank, _, inc in opts} for name, opts in options.items()}},
    )


# ----- SVD-LLM v2 ------------------------------------------------------------------------------


def layer_type(name: str) -> str:
    """The module name with its layer indices replaced by ``*`` (``model.layers.*.mlp.up_proj``)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)


def truncation_loss(context: AllocationContext, spec: LayerSpec, rank: int) -> float:
    """``L_l``: the output error of the method's rank-``rank`` factorisation on the calibration
    inputs, ``sqrt(tr(E C E^T))`` with ``E = W - up down``, or ``||E||_F`` without input statistics."""
    layer = context.model.get_submodule(spec.name)
    stats = context.stats.get(spec.name)
    up, down = context.compressor.factorize(spec.name, layer, rank, stats)
    error = dense_weight(layer).to(torch.float64) - up.to(torch.float64) @ down.to(torch.float64)
    covariance = None if stats is None else stats.input_covariance
    if covariance is None:
        return float(torch.linalg.matrix_norm(error))
    gram = gram_of(covariance).to(error.device)  # refuses a layer that saw no rows, as the methods do
    return float(torch.einsum("oi,ij,oj->", error, gram, error).clamp_min(0.0).sqrt())


def svd_llm_v2(context: AllocationContext) -> Allocation:
    uniform(context)  # the same refusal of a ratio below rank 1
    compression = 1.0 - context.ratio
    groups: dict[tuple, list[LayerSpec]] = {}
    for spec in context.specs:
        groups.setdefault((layer_type(spec.name), spec.out_features, spec.in_features), []).append(spec)
    ranks, losses, uniform_groups = {}, {}, []
    for (kind, _, _), members in groups.items():
        group_losses = [truncation_loss(context, spec, uniform_rank(spec, context.ratio)) for spec in members]
        losses.update({spec.name: loss for spec, loss in zip(members, group_losses)})
        if len(members) < 2 or min(group_losses) <= 1.0:
            uniform_groups.append(kind)
            ranks.update({spec.name: uniform_rank(spec, context.ratio) for spec in members})
            continue
        weights = [1.0 / math.log(loss) for loss in group_losses]
        for spec, weight in zip(members, weights):
            share = len(members) * compression * weight / sum(weights)
            ranks[spec.name] = max(1, min(spec.full_rank, math.floor((1.0 - share) * spec.break_even)))
    return Allocation(ranks, {"truncation_loss": losses, "uniform_groups": uniform_groups})


ALLOCATIONS: dict[str, Callable[[AllocationContext], Allocation]] = {
    "uniform": uniform,
    "welore": welore,
    "sensitivity": sensitivity,
    "svd_llm_v2": svd_llm_v2,
}
