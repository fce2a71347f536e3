"""The compression pillar's contract: what ``ratio`` means, the method interface, and ``compress``.

**What ``ratio`` means.** ``ratio`` is the fraction of the *targeted layers' weight
parameters* that REMAINS after compression (``ratio=0.8`` keeps 80%, i.e. "20% compression"
in SVD-LLM's wording; SVD-LLM's own ``--ratio`` and WeLore's "rank reduction" count other
things, see their modules). A targeted ``out x in`` layer (``m x n``) kept at rank ``k`` as two
factors holds ``k (m + n)`` weights; with the default ``allocation="uniform"`` every layer gets
its share,

    k = max(1, floor(ratio * m * n / (m + n))),

so ``k (m + n) <= ratio m n < (k + 1)(m + n)``: the ratio is met within one rank step per layer.
Biases are kept unchanged and are not counted on either side; embeddings, norms and
untargeted layers are not counted either. The realised ratio ``sum kept / sum m n`` is
reported per layer and in total (``model.rankwise_compression``, :meth:`CompressionPlan.describe`).

**Rank allocation** is independent of the factorisation (:mod:`rankwise.compress.allocation`):
``"uniform"`` (above), ``"welore"`` (one global threshold on min-max normalised singular
values, searched to meet the ratio: non-uniform ranks, untouched N-LRC layers) or
``"sensitivity"`` (each layer's measured loss increase at candidate ranks, a Lagrangian
search to meet the ratio) or ``"svd_llm_v2"`` (SVD-LLM v2: each same-type group's compression
shared in proportion to ``1 / log`` of every layer's truncation loss). ``allocation=None`` takes the method's default.

**Speed is part of the storage rule** (:mod:`rankwise.compress.plan`): a layer whose kept rank
is at or above ``keep_dense_above * m n / (m + n)`` (the measured break-even factor of
:mod:`rankwise.compress.speed`) keeps a dense ``m x n`` weight -- its rank-``k`` product --
because two thin products are slower than one dense product there; it then keeps all its
``m n`` weights, and the realised ratio says so. ``keep_dense_above=None`` factorises every
layer whose factors hold fewer weights than the matrix.

**Layer kinds.** ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2) are factorised (through
:func:`rankwise.layers.dense_weight`, the ``out x in`` matrix); a targeted layer a method cannot
take (a bitsandbytes-quantized one; for MoDeGPT anything outside LLaMA-style blocks) is
skipped and listed in ``model.rankwise_compression["skipped"]`` with the reason.

**Adding a method** = one file with a :class:`Compressor` subclass registered in
``COMPRESSORS`` (family, paper, arXiv id, ``needs_data=True`` for data-driven methods) and
imported by ``compress/__init__.py``, plus one row in ``tests/cases/compress_*.py``. It
declares its keyword options as :class:`rankwise.options.Option` in ``OPTIONS`` (the base
class checks them once; values in ``self.options``) and the calibration statistics it needs
in ``calibration`` (kinds of :mod:`rankwise.compress.statistics`: ``input_covariance``,
``input_abs_mean``, ``weight_fisher``); ``compress`` collects them from ``data`` on the
unmodified model and hands each layer's :class:`~rankwise.calibration.LayerStatistics` to
:meth:`Compressor.factorize`, which returns the two factors. A method that changes whole
modules (MoDeGPT) overrides :meth:`Compressor.plan` and :meth:`Compressor.build` instead.
Everything is computed before any module is swapped, so a failure leaves the model as it
was (a post-swap :meth:`Compressor.refit` that fails puts the original modules back).
"""

from __future__ import annotations

import copy
import logging
from abc import ABC
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from rankwise.calibration import LayerStatistics, materialise_data
from rankwise.compress.allocation import ALLOCATIONS, AllocationContext, uniform_rank
from rankwise.compress.plan import CompressionPlan, LayerSpec, PlannedLayer
from rankwise.compress.speed import BREAK_EVEN_FACTOR
from rankwise.compress.statistics import LossFn, collect
from rankwise.errors import RankwiseError
from rankwise.layers import features, layer_kind
from rankwise.nn import FactorizedLinear, select_linear_layers
from rankwise.options import Option, declared_options, resolve
from rankwise.registry import Registry
from rankwise.targets import Targets, replace_module

log = logging.getLogger(__name__)


#: the kept fraction every compression call takes (a keyword of ``compress``, not a method option)
RATIO = Option(0.5, float, low=0, high=1, low_open=True, high_open=True,
               help="fraction of the targeted layers' weight parameters that remains, e.g. 0.8")
ALLOCATION = Option(None, str, choices=tuple(ALLOCATIONS), nullable=True,
                    help="how ranks are shared among layers; None = the method's default")
KEEP_DENSE_ABOVE = Option(
    BREAK_EVEN_FACTOR, float, low=0, low_open=True, nullable=True,
    help="a layer kept at rank k >= this x m n / (m + n) stays dense (faster there); None = factorise all",
)


@dataclass
class CompressionJob:
    """One ``compress`` call's checked arguments."""

    model: nn.Module
    ratio: float
    targets: Targets
    allocation: str
    keep_dense_above: float | None
    data: list[Any] | None
    loss_fn: LossFn | None


def _refuse_skipped_everything(method: str, skipped: dict[str, str]) -> RankwiseError:
    sample = "; ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:3])
    return RankwiseError(f"{method} can take none of the targeted layers ({sample}); choose other targets or method")


class Compressor(ABC):
    """One post-training low-rank compression method.

    Subclasses declare their options in ``OPTIONS`` (checked here, values in
    ``self.options``), set ``calibration`` to the statistics they need from the calibration
    data (empty for data-free methods) and implement :meth:`factorize`.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {}
    #: statistic kinds (``rankwise.compress.statistics.KINDS``) it reads; () = data-free
    calibration: ClassVar[tuple[str, ...]] = ()
    #: the rank allocation used when ``compress(..., allocation=None)``
    default_allocation: ClassVar[str] = "uniform"
    #: the allocations it accepts
    allocations: ClassVar[tuple[str, ...]] = tuple(ALLOCATIONS)
    #: layer kinds (``rankwise.layers.layer_kind``) it factorises; other targeted layers are skipped
    supports: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    def __init__(self, *, method: str = "", **options: Any) -> None:
        self.method = method or type(self).__name__
        self.options = resolve(declared_options(type(self)), options, owner=f"compression method {self.method!r}")

    # ----- what a method provides -------------------------------------------------------------

    def factorize(
        self, name: str, layer: nn.Module, rank: int, stats: LayerStatistics | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(up, down)``: ``up`` (out x rank), ``down`` (rank x in) of the layer's ``out x in``
        weight (:func:`rankwise.layers.dense_weight`), any float dtype."""
        raise NotImplementedError(f"{type(self).__name__} does not factorise single layers")

    def allocation_options(self) -> dict[str, Any]:
        """Settings the allocation reads from the method's options (WeLore's ``min_ratio``)."""
        return {}

    def refit(self, model: nn.Module, swapped: dict[str, tuple[nn.Module, nn.Module]], job: CompressionJob) -> None:
        """After the swap (``swapped``: name -> (original module, its replacement, now in the model)):
        adjust the replacements on the compressed model's own activations (default: nothing)."""

    # ----- the steps compress runs --------------------------------------------------------------

    def needs_data(self, allocation: str) -> bool:
        return bool(self.calibration) or allocation == "sensitivity"

    def check_allocation(self, allocation: str | None) -> str:
        allocation = ALLOCATION.check("allocation", allocation, owner=f"compression method {self.method!r}")
        allocation = allocation or self.default_allocation
        if allocation not in self.allocations:
            raise RankwiseError(f"compression method {self.method!r} takes allocation "
                                f"{' or '.join(repr(a) for a in self.allocations)}, not {allocation!r}")
        return allocation

    def select(self, job: CompressionJob) -> tuple[list[LayerSpec], dict[str, str]]:
        """The targeted Linear-like layers it takes, and the skipped ones with the reason."""
        specs, skipped = [], {}
        structured = [name for name, m in job.model.named_modules() if callable(getattr(m, "compressed_spec", None))]
        for name in select_linear_layers(job.model, job.targets, kind=None):
            module = job.model.get_submodule(name)
            kind = layer_kind(module)
            inside = next((block for block in structured if name.startswith(block + ".")), None)
            if inside is not None:
                skipped[name] = f"already compressed: part of the structured block {inside}"
            elif kind in self.supports:
                specs.append(LayerSpec(name, kind, *features(module)))
            elif kind in ("linear4bit", "linear8bit"):
                skipped[name] = (f"a bitsandbytes {kind} layer: compress the unquantized model, or compensate "
                                 "the quantization error with rankwise.compensate")
            else:
                skipped[name] = f"{self.method} cannot factorise a {kind} layer"
        if not specs:
            raise _refuse_skipped_everything(self.method, skipped)
        return specs, skipped

    def statistics(self, job: CompressionJob, names: list[str]) -> dict[str, LayerStatistics]:
        if not self.calibration:
            return {}
        return collect(job.model, names, job.data, self.calibration, loss_fn=job.loss_fn, need=self.method)

    def plan(self, job: CompressionJob) -> tuple[CompressionPlan, dict[str, LayerStatistics]]:
        """Per-layer ranks and storage (nothing changed), and the statistics they were computed from."""
        specs, skipped = self.select(job)
        stats = self.statistics(job, [spec.name for spec in specs])
        context = AllocationContext(job.model, specs, job.ratio, job.keep_dense_above, self, stats, job.data,
                                    job.loss_fn, self.allocation_options())
        allocated = ALLOCATIONS[job.allocation](context)
        layers = {spec.name: PlannedLayer.linear(spec, allocated.ranks[spec.name], job.keep_dense_above)
                  for spec in specs}
        plan = CompressionPlan(self.method, job.allocation, job.ratio, job.keep_dense_above, layers, skipped,
                               allocated.info)
        return plan, stats

    def build(
        self, job: CompressionJob, plan: CompressionPlan, stats: dict[str, LayerStatistics]
    ) -> dict[str, nn.Module]:
        """The replacement module of every planned layer that changes (untouched ones are left out)."""
        replacements: dict[str, nn.Module] = {}
        for name, planned in plan.layers.items():
            if planned.storage == "untouched":
                continue
            layer = job.model.get_submodule(name)
            up, down = self.factorize(name, layer, planned.rank, stats.get(name))
            replacements[name] = replacement_module(layer, planned.storage, up, down)
        return replacements


def replacement_module(layer: nn.Module, storage: str, up: torch.Tensor, down: torch.Tensor) -> nn.Module:
    """A :class:`FactorizedLinear` holding ``up`` / ``down``, or (``storage == "dense"``) a copy of
    ``layer`` whose weight is ``up @ down``; the layer's dtype, device, bias and mode."""
    weight = layer.weight
    if storage == "factorized":
        return FactorizedLinear.from_factors(
            up.to(device=weight.device, dtype=weight.dtype), down.to(device=weight.device, dtype=weight.dtype),
            layer.bias, source_kind=layer_kind(layer),
        ).train(layer.training)
    product = (up.to(device=weight.device, dtype=torch.float64) @ down.to(device=weight.device, dtype=torch.float64))
    dense = copy.deepcopy(layer)
    with torch.no_grad():
        dense.weight.copy_((product.T if layer_kind(layer) == "conv1d" else product).to(weight.dtype))
    return dense


COMPRESSORS: Registry[type[Compressor]] = Registry("compression method")


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """``max(1, floor(ratio * m * n / (m + n)))`` for an ``m x n`` (out x in) layer."""
    return uniform_rank(LayerSpec("", "linear", out_features, in_features), ratio)


def build_compressor(method: str, options: dict[str, Any]) -> Compressor:
    """Instantiate a registered method; unknown names or options raise RankwiseError."""
    return COMPRESSORS.get(method)(method=method, **options)


def method_options(name: str) -> dict[str, Option]:
    """The options compression method ``name`` declares (``rankwise compress --help-method``)."""
    return declared_options(COMPRESSORS.get(name))


def _job(model, method, ratio, data, targets, allocation, keep_dense_above, loss_fn, options):
    ratio = RATIO.check("ratio", ratio, owner="compress (ratio is the fraction of the targeted weights that remains)")
    compressor = build_compressor(method, options)
    allocation = compressor.check_allocation(allocation)
    keep_dense_above = KEEP_DENSE_ABOVE.check("keep_dense_above", keep_dense_above, owner="compress")
    batches = None
    if compressor.needs_data(allocation):
        if data is None:
            why = (f"compression method {method!r} is data-driven" if compressor.calibration
                   else "allocation 'sensitivity' measures each layer's loss")
            raise RankwiseError(f"{why}: pass data= (an iterable of model-input batches, e.g. dicts with input_ids)")
        batches = materialise_data(data)
    return compressor, CompressionJob(model, ratio, targets, allocation, keep_dense_above, batches, loss_fn)


def plan_ranks(
    model: nn.Module,
    ratio: float,
    targets: Targets = "all-linear",
    *,
    method: str = "svd",
    data: Iterable[Any] | None = None,
    allocation: str | None = None,
    keep_dense_above: float | None = BREAK_EVEN_FACTOR,
    loss_fn: LossFn | None = None,
    **options: Any,
) -> CompressionPlan:
    """The plan ``compress`` would carry out (validates everything, changes nothing)."""
    compressor, job = _job(model, method, ratio, data, targets, allocation, keep_dense_above, loss_fn, options)
    with torch.no_grad():
        return compressor.plan(job)[0]


def compress(
    model: nn.Module,
    method: str,
    *,
    ratio: float,
    data: Iterable[Any] | None = None,
    targets: Targets = "all-linear",
    allocation: str | None = None,
    keep_dense_above: float | None = BREAK_EVEN_FACTOR,
    loss_fn: LossFn | None = None,
    **options: Any,
) -> nn.Module:
    """Compress the targeted Linear-like layers of ``model`` with ``method``, in place.

    ``ratio`` is the fraction of the targeted layers' weight parameters that remains (biases
    kept, not counted; see the module docstring). ``data`` is an iterable of model-input
    batches (dicts of tensors or input-id tensors) for data-driven methods and the
    ``"sensitivity"`` allocation; data-free methods ignore it. ``allocation`` picks how ranks are
    shared (None: the method's default); ``keep_dense_above`` is the speed break-even factor
    (None: factorise whatever saves weights); ``loss_fn(model, batch) -> scalar`` gives a loss
    to methods that need one (FWSVD, the sensitivity allocation) on models without their own.
    ``options`` go to the method.

    Returns ``model``; the plan's summary (per-layer rank, storage and ratio, the total, the
    skipped layers) is logged and stored in ``model.rankwise_compression``. On any error the
    model is left as it was.
    """
    compressor, job = _job(model, method, ratio, data, targets, allocation, keep_dense_above, loss_fn, options)
    with torch.no_grad():
        plan, stats = compressor.plan(job)
        replacements = compressor.build(job, plan, stats)
    originals = {name: replace_module(model, name, module) for name, module in replacements.items()}
    try:
        compressor.refit(model, {name: (originals[name], replacements[name]) for name in replacements}, job)
    except BaseException:
        for name, module in originals.items():
            replace_module(model, name, module)
        raise
    model.rankwise_compression = plan.summary()
    log.info(plan.describe())
    return model
