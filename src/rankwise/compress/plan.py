"""What compression keeps of each layer and what that costs: layer specs, the storage rule, the plan.

A targeted Linear-like layer is ``m x n`` (out x in; :class:`LayerSpec`). Kept at rank ``k`` it
is stored one of three ways (:func:`storage_for`):

- ``"factorized"``: two factors, ``k (m + n)`` weights -- when ``k < f * m n / (m + n)``, ``f``
  being ``keep_dense_above`` (the measured speed break-even factor, :mod:`rankwise.compress.speed`)
  and ``k (m + n) < m n`` (the factors hold fewer weights than the matrix);
- ``"dense"``: the rank-``k`` product written into the original dense layer, ``m n`` weights --
  when ``k`` is at or above that break-even: two thin products would be slower than one
  dense one there, so the layer keeps its speed and loses only accuracy;
- ``"untouched"``: ``k = min(m, n)``, the layer as it was (WeLore's N-LRC), ``m n`` weights.

Biases are kept and never counted. :class:`CompressionPlan` sums the kept weights; its
``realised_ratio`` is ``kept / dense`` over the targeted layers (structured methods such as
MoDeGPT plan whole modules with their own counts, :meth:`PlannedLayer.structured`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STORAGE = ("factorized", "dense", "untouched", "structured")


@dataclass(frozen=True)
class LayerSpec:
    """A targeted Linear-like layer: its module name, kind (``rankwise.layers.layer_kind``) and shape."""

    name: str
    kind: str
    out_features: int
    in_features: int

    @property
    def parameters(self) -> int:
        return self.out_features * self.in_features

    @property
    def full_rank(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def break_even(self) -> float:
        """``m n / (m + n)``: the rank at which two factors hold as many weights as the matrix."""
        return self.parameters / (self.out_features + self.in_features)


def storage_for(spec: LayerSpec, rank: int, keep_dense_above: float | None) -> str:
    """``"factorized"``, ``"dense"`` or ``"untouched"`` for ``spec`` kept at ``rank`` (rules above)."""
    if rank >= spec.full_rank:
        return "untouched"
    cheaper = rank * (spec.out_features + spec.in_features) < spec.parameters
    faster = keep_dense_above is None or rank < keep_dense_above * spec.break_even
    return "factorized" if cheaper and faster else "dense"


def kept_parameters(spec: LayerSpec, rank: int, keep_dense_above: float | None) -> int:
    """Weights stored for ``spec`` at ``rank`` under the storage rule."""
    if storage_for(spec, rank, keep_dense_above) == "factorized":
        return rank * (spec.out_features + spec.in_features)
    return spec.parameters


@dataclass(frozen=True)
class PlannedLayer:
    """One planned module: its rank (or structured size), how it is stored and the weights kept."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    storage: str
    dense_parameters: int
    kept_parameters: int
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def linear(cls, spec: LayerSpec, rank: int, keep_dense_above: float | None) -> "PlannedLayer":
        return cls(spec.name, spec.kind, (spec.out_features, spec.in_features), rank,
                   storage_for(spec, rank, keep_dense_above), spec.parameters,
                   kept_parameters(spec, rank, keep_dense_above))

    @classmethod
    def structured(cls, name: str, kind: str, shape: tuple[int, ...], rank: int, dense_parameters: int,
                   kept_parameters: int, **detail: Any) -> "PlannedLayer":
        return cls(name, kind, shape, rank, "structured", dense_parameters, kept_parameters, dict(detail))

    @property
    def ratio(self) -> float:
        return self.kept_parameters / self.dense_parameters

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "shape": list(self.shape), "rank": self.rank, "storage": self.storage,
                "dense_parameters": self.dense_parameters, "kept_parameters": self.kept_parameters,
                "ratio": self.ratio, **self.detail}


@dataclass
class CompressionPlan:
    """Per-module ranks, storage and the parameter budget they realise (biases not counted).

    ``skipped`` lists targeted layers the method cannot take, with the reason.
    """

    method: str
    allocation: str
    ratio: float
    keep_dense_above: float | None
    layers: dict[str, PlannedLayer]
    skipped: dict[str, str] = field(default_factory=dict)
    #: what the allocation found (WeLore's threshold, the sensitivity search's multiplier, ...)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dense_parameters(self) -> int:
        return sum(layer.dense_parameters for layer in self.layers.values())

    @property
    def kept_parameters(self) -> int:
        return sum(layer.kept_parameters for layer in self.layers.values())

    @property
    def realised_ratio(self) -> float:
        return self.kept_parameters / self.dense_parameters

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.layers.items()}

    def with_storage(self, storage: str) -> list[str]:
        return [name for name, layer in self.layers.items() if layer.storage == storage]

    def summary(self) -> dict[str, Any]:
        """What ``compress`` stores in ``model.rankwise_compression`` (JSON-serialisable)."""
        return {
            "method": self.method,
            "allocation": self.allocation,
            "requested_ratio": self.ratio,
            "realised_ratio": self.realised_ratio,
            "dense_parameters": self.dense_parameters,
            "kept_parameters": self.kept_parameters,
            "keep_dense_above": self.keep_dense_above,
            "ranks": self.ranks,
            "layers": {name: layer.summary() for name, layer in self.layers.items()},
            "skipped": dict(self.skipped),
            "allocation_info": dict(self.info),
        }

    def describe(self) -> str:
        """One paragraph for people: what was kept, and what the ratio means."""
        counts = {s: len(self.with_storage(s)) for s in STORAGE if self.with_storage(s)}
        stored = ", ".join(f"{n} {s}" for s, n in counts.items())
        text = (f"{self.method} ({self.allocation} allocation): kept {self.kept_parameters:,} of "
                f"{self.dense_parameters:,} weights of the {len(self.layers)} targeted modules "
                f"(realised ratio {self.realised_ratio:.4f}, requested {self.ratio:.4f}; the ratio is the "
                f"fraction of the targeted layers' weights that remains, biases not counted); {stored}")
        dense = self.with_storage("dense")
        if dense:
            text += (f"; {len(dense)} layer(s) keep a dense rank-k weight because k >= {self.keep_dense_above} "
                     "m n / (m + n), where two thin products are slower than one dense product "
                     "(keep_dense_above=None factorises them: fewer weights, slower)")
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(f"{n} ({r})" for n, r in list(self.skipped.items())[:4])
        return text
