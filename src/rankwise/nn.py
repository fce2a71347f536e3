"""Layer modules shared by the pillars that change a model's structure.

:class:`FactorizedLinear` is the drop-in replacement for ``nn.Linear`` used by compression
(``rankwise.compress``) and low-rank pretraining (``rankwise.pretrain``):

    y = up(down(x)) = B (A x) + b,   A = down.weight (rank x in),  B = up.weight (out x rank)

It holds ``rank * (in + out)`` weights instead of ``in * out`` (plus the same optional bias
on ``up``), and costs two thin matrix products instead of one dense one. It may stand in for
any Linear-like layer (``nn.Linear``, transformers' ``Conv1D``): ``source_kind`` remembers
which, so ``rankwise.densify`` gives back a layer of the original kind.

:func:`select_linear_layers` picks the dense layers a method should replace (through
:func:`rankwise.targets.match_targets`; ``nn.Linear`` by default, every Linear-like kind with
``kind=None``), skipping the two inner ``nn.Linear`` of an existing :class:`FactorizedLinear`
so a model is never factorised twice.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import truncated_svd
from rankwise.targets import Targets, match_targets


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RankwiseError(f"{what} must be a positive integer, got {value!r}")
    return value


#: the dense layer kinds a FactorizedLinear can stand in for (``rankwise.layers.layer_kind`` names)
SOURCE_KINDS = ("linear", "conv1d")


class FactorizedLinear(nn.Module):
    """``y = up(down(x))``: a linear map of rank at most ``rank`` stored as two factors."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        source_kind: str = "linear",
    ) -> None:
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        self.rank = _positive_int(rank, "rank")
        if source_kind not in SOURCE_KINDS:
            raise RankwiseError(f"source_kind must be one of {', '.join(SOURCE_KINDS)}, got {source_kind!r}")
        self.source_kind = source_kind
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    @classmethod
    def from_factors(
        cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None, *, source_kind: str = "linear"
    ) -> "FactorizedLinear":
        """A layer with ``up.weight = up`` (out x rank), ``down.weight = down`` (rank x in).

        Device and dtype follow ``bias`` when given (the original layer's), else ``up``;
        the factors are cast to them. ``source_kind`` names the kind of layer it replaces.
        """
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise RankwiseError(
                f"factors must be up (out x rank) and down (rank x in), got {tuple(up.shape)} and {tuple(down.shape)}"
            )
        if bias is not None and bias.shape != (up.shape[0],):
            raise RankwiseError(f"bias must have shape ({up.shape[0]},), got {tuple(bias.shape)}")
        like = bias if bias is not None else up
        layer = cls(
            down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device=like.device, dtype=like.dtype,
            source_kind=source_kind,
        )
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "FactorizedLinear":
        """Best rank-``rank`` approximation of ``linear`` (Eckart-Young), split as in
        :func:`rankwise.linalg.lowrank.split_singular_values`; SVD in fp32, factors in the
        layer's dtype and device."""
        rank = _positive_int(rank, "rank")
        if rank > min(linear.in_features, linear.out_features):
            raise RankwiseError(
                f"rank {rank} exceeds min(in, out) = {min(linear.in_features, linear.out_features)} of the layer"
            )
        up, down = split_singular_values(*truncated_svd(linear.weight, rank))
        layer = cls.from_factors(up.to(linear.weight.dtype), down.to(linear.weight.dtype), linear.bias)
        return layer.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The ``out x in`` matrix ``up.weight @ down.weight`` this layer applies."""
        return self.up.weight @ self.down.weight

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same map (the dense product, same dtype/device)."""
        weight = self.up.weight
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def factor_parameters(self) -> int:
        """Weights in the two factors, ``rank * (in + out)`` (the bias is not counted)."""
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
            + ("" if self.source_kind == "linear" else f", source_kind={self.source_kind}")
        )


def _inside_factorized(model: nn.Module, name: str) -> bool:
    parent_name, _, _ = name.rpartition(".")
    return bool(parent_name) and isinstance(model.get_submodule(parent_name), FactorizedLinear)


def select_linear_layers(
    model: nn.Module,
    targets: Targets = "all-linear",
    *,
    include_factorized: bool = False,
    kind: type | None = nn.Linear,
) -> list[str]:
    """Names of the layers ``targets`` selects, in module order.

    Dense layers of ``kind`` always (``nn.Linear`` by default; None = every Linear-like kind:
    Linear, Conv1D, bitsandbytes Linear); with ``include_factorized`` also whole
    :class:`FactorizedLinear` layers (for diagnostics). The ``down`` / ``up`` children of a
    FactorizedLinear are never returned on their own. Raises RankwiseError when nothing is
    selected, before anything is changed.
    """
    try:
        dense = [n for n in match_targets(model, targets, kind=kind) if not _inside_factorized(model, n)]
        no_dense_error: RankwiseError | None = None
    except RankwiseError as exc:
        dense, no_dense_error = [], exc
    factorized: list[str] = []
    if include_factorized and any(isinstance(m, FactorizedLinear) for m in model.modules()):
        try:
            factorized = match_targets(model, targets, kind=FactorizedLinear)
        except RankwiseError:
            factorized = []
    chosen = set(dense) | set(factorized)
    if not chosen:
        if no_dense_error is not None:
            raise no_dense_error
        raise RankwiseError(
            f"targets {targets!r} matched only layers that are already FactorizedLinear; "
            "choose dense Linear layers (they cannot be factorised twice)"
        )
    return [n for n, _ in model.named_modules() if n in chosen]
