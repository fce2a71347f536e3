"""The compression pillar's contract: rank budget, method interface, and ``compress``.

**What ``ratio`` means.** ``ratio`` is the fraction of the *targeted layers' weight
parameters* that REMAINS after compression (``ratio=0.8`` keeps 80%, i.e. "20%
compression" in SVD-LLM's wording). A targeted ``out x in`` layer (``m x n``) at ratio
``rho`` keeps rank

    k = max(1, floor(rho * m * n / (m + n)))

so its two factors hold ``k (m + n) <= rho m n`` weights. Biases are kept unchanged and are
not counted on either side; embeddings, norms and untargeted layers are not counted either.
The realised ratio ``sum_l k_l (m_l + n_l) / sum_l m_l n_l`` is therefore never above the
requested one; :func:`plan_ranks` computes it and ``compress`` reports it (log line and
``model.rankwise_compression``). When even ``k = 1`` would exceed the budget of a layer
(``rho < (m + n) / (m n)``) the request cannot be met and is refused.

**Adding a method** = one file with a :class:`Compressor` subclass registered in
``COMPRESSORS`` (family, paper, arXiv id, ``needs_data=True`` for data-driven methods) and
imported by ``compress/__init__.py``, plus one row in ``tests/cases/compress_*.py``. It
declares its keyword options as :class:`rankwise.options.Option` in ``OPTIONS`` (the base
class checks them once; values in ``self.options``) and the calibration statistics it needs
in ``calibration`` (kinds of :mod:`rankwise.calibration`: ``input_covariance`` for whitening /
covariance methods such as SVD-LLM and EoRA, ``weight_gradient`` for Fisher-weighted SVD,
``input_batches`` for anything else, e.g. ASVD's ``mean |x|``); ``compress`` collects them
from ``data`` with the shared collector on the unmodified model and hands each layer's
:class:`LayerStatistics` to :meth:`Compressor.factorize`, which returns the two factors.
All factors are computed before any module is swapped, so a failure leaves the model as
it was.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from rankwise.calibration import LayerStatistics, collect_statistics, materialise_data
from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear, select_linear_layers
from rankwise.options import Option, declared_options, resolve
from rankwise.registry import Registry
from rankwise.targets import Targets, replace_module

log = logging.getLogger(__name__)


#: the kept fraction every compression call takes (a keyword of ``compress``, not a method option)
RATIO = Option(0.5, float, low=0, high=1, low_open=True, high_open=True,
               help="fraction of the targeted layers' weight parameters that remains, e.g. 0.8")


class Compressor(ABC):
    """One post-training low-rank compression method.

    Subclasses declare their options in ``OPTIONS`` (checked here, values in
    ``self.options``), set ``calibration`` to the statistics they need from the calibration
    data (empty for data-free methods) and implement :meth:`factorize`.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {}
    #: statistic kinds (``rankwise.calibration.STATISTIC_KINDS``) it reads; () = data-free
    calibration: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, method: str = "", **options: Any) -> None:
        self.method = method or type(self).__name__
        self.options = resolve(declared_options(type(self)), options, owner=f"compression method {self.method!r}")

    @abstractmethod
    def factorize(
        self, name: str, linear: nn.Linear, rank: int, stats: LayerStatistics | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(up, down)``: ``up`` (out x rank), ``down`` (rank x in), any float dtype."""


COMPRESSORS: Registry[type[Compressor]] = Registry("compression method")


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """``max(1, floor(ratio * m * n / (m + n)))`` for an ``m x n`` (out x in) layer."""
    return max(1, math.floor(ratio * out_features * in_features / (out_features + in_features)))


@dataclass
class CompressionPlan:
    """Per-layer kept ranks and the parameter budget they realise (biases not counted)."""

    ratio: float
    ranks: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    dense_parameters: int = field(init=False)
    kept_parameters: int = field(init=False)

    def __post_init__(self) -> None:
        self.dense_parameters = sum(m * n for m, n in self.shapes.values())
        self.kept_parameters = sum(self.ranks[k] * (m + n) for k, (m, n) in self.shapes.items())

    @property
    def realised_ratio(self) -> float:
        return self.kept_parameters / self.dense_parameters

    def summary(self, method: str) -> dict[str, Any]:
        return {
            "method": method,
            "requested_ratio": self.ratio,
            "realised_ratio": self.realised_ratio,
            "dense_parameters": self.dense_parameters,
            "kept_parameters": self.kept_parameters,
            "ranks": dict(self.ranks),
        }


def _check_ratio(ratio: object) -> float:
    return RATIO.check("ratio", ratio, owner="compress (ratio is the fraction of the targeted weights that remains)")


def plan_ranks(model: nn.Module, ratio: float, targets: Targets = "all-linear") -> CompressionPlan:
    """The ranks ``compress`` would keep at ``ratio`` (validates everything, changes nothing)."""
    ratio = _check_ratio(ratio)
    names = select_linear_layers(model, targets)
    shapes: dict[str, tuple[int, int]] = {}
    ranks: dict[str, int] = {}
    for name in names:
        layer = model.get_submodule(name)
        m, n = layer.out_features, layer.in_features
        if ratio * m * n < m + n:
            raise RankwiseError(
                f"ratio {ratio} is below what a rank-1 factorisation of {name} ({m} x {n}) keeps, "
                f"(m + n) / (m n) = {(m + n) / (m * n):.4g}; raise ratio or leave that layer out of targets"
            )
        shapes[name] = (m, n)
        ranks[name] = rank_for_ratio(m, n, ratio)
    return CompressionPlan(ratio, ranks, shapes)


def build_compressor(method: str, options: dict[str, Any]) -> Compressor:
    """Instantiate a registered method; unknown names or options raise RankwiseError."""
    return COMPRESSORS.get(method)(method=method, **options)


def method_options(name: str) -> dict[str, Option]:
    """The options compression method ``name`` declares (``rankwise compress --help-method``)."""
    return declared_options(COMPRESSORS.get(name))


def compress(
    model: nn.Module,
    method: str,
    *,
    ratio: float,
    data: Iterable[Any] | None = None,
    targets: Targets = "all-linear",
    **options: Any,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by :class:`FactorizedLinear`.

    ``ratio`` is the fraction of the targeted layers' weight parameters that remains (biases
    kept, not counted); layer ``m x n`` keeps rank ``max(1, floor(ratio m n / (m + n)))``.
    ``data`` is an iterable of model-input batches (dicts of tensors or input-id tensors)
    for data-driven methods; data-free methods ignore it. ``options`` go to the method.

    Modifies ``model`` in place and returns it; the realised ratio (<= ``ratio``) and the
    per-layer ranks are logged and stored in ``model.rankwise_compression``. On any error
    the model is left untouched.
    """
    ratio = _check_ratio(ratio)
    compressor = build_compressor(method, options)
    plan = plan_ranks(model, ratio, targets)
    stats: dict[str, LayerStatistics] = {}
    if compressor.calibration:
        if data is None:
            raise RankwiseError(
                f"compression method {method!r} is data-driven: pass data= (an iterable of model-input batches)"
            )
        stats = collect_statistics(model, list(plan.ranks), materialise_data(data), compressor.calibration)

    replacements: dict[str, FactorizedLinear] = {}
    for name, rank in plan.ranks.items():
        linear = model.get_submodule(name)
        up, down = compressor.factorize(name, linear, rank, stats.get(name))
        weight = linear.weight
        replacements[name] = FactorizedLinear.from_factors(
            up.to(device=weight.device, dtype=weight.dtype),
            down.to(device=weight.device, dtype=weight.dtype),
            linear.bias,
        ).train(linear.training)
    for name, layer in replacements.items():
        replace_module(model, name, layer)

    model.rankwise_compression = plan.summary(method)
    log.info(
        "compressed %d layers with %s: kept %d of %d weights (ratio %.4f, requested %.4f)",
        len(plan.ranks), method, plan.kept_parameters, plan.dense_parameters, plan.realised_ratio, ratio,
    )
    return model
