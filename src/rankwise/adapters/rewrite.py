"""What the decomposition inits share: adapters that move part of ``W`` out of the frozen base.

A :class:`FactoredRewriteLayer` starts from factors of the weight (SVD, QR, LDU, ...) and
subtracts their initial product from the base, so the output at init equals the base
model's; the initial factors stay as buffers so a saved adapter turns a fresh base into the
same residual on load and exports can reconstruct the original ``W`` (LoLDU, SORSA, SVFit).
:class:`LoraRewriteLayer` is the LoRA-shaped case (PiSSA, OLoRA, CorDA, LoRA-GA): trainable
``lora_A`` / ``lora_B`` (:class:`~rankwise.adapters.lora_family.LoraShapedLayer`) starting at
the buffers ``A0`` / ``B0``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from rankwise.adapters.base import AdapterLayer
from rankwise.adapters.lora_family import LoraShapedLayer
from rankwise.linalg import SVDFailure, truncated_svd

Factors = tuple[torch.Tensor, torch.Tensor]


class FactoredRewriteLayer(AdapterLayer):
    """A base-rewriting adapter whose update and base offset are products of two factors.

    Subclasses define :meth:`update_factors` (trainable, ``left @ right`` is the update with
    any scaling folded in) and :meth:`initial_factors` (from buffers: what was moved out of
    the base). Everything else -- ``delta_weight``, the thin-matmul forward, ``base_offset``
    and the PEFT-export views :meth:`lora_factors` / :meth:`base_offset_factors` -- follows.
    """

    rewrites_base = True

    def update_factors(self, dtype: torch.dtype | None = None) -> Factors:
        """``(left, right)``, ``out x k`` and ``k x in``, with ``left @ right == delta_weight()``."""
        raise NotImplementedError

    def initial_factors(self, dtype: torch.dtype | None = None) -> Factors:
        """``(left0, right0)`` with ``left0 @ right0 == base_offset()``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        left, right = self.update_factors()
        return left @ right

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.update_factors()
        # Two thin products (tokens x k) instead of materialising the out x in update.
        return (x.to(right.dtype) @ right.T) @ left.T

    def base_offset(self) -> torch.Tensor:
        """``left0 @ right0`` in float32 (the residual ``W - offset`` is then rounded once, to the weight's dtype)."""
        left, right = self.initial_factors(torch.float32)
        return left @ right

    def lora_factors(self) -> Factors:
        """``(B, A)`` in float32 with ``B @ A == delta_weight()`` (scaling folded in), for PEFT export."""
        left, right = self.update_factors(torch.float32)
        return left.detach(), right.detach()

    def base_offset_factors(self) -> Factors:
        """``(B0, A0)`` in float32 with ``B0 @ A0 == base_offset()``, for PEFT export."""
        left, right = self.initial_factors(torch.float32)
        return left.detach(), right.detach()


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` converted to ``dtype``; unchanged when ``dtype`` is None (the stored dtype)."""
    return tensor if dtype is None else tensor.to(dtype)


#: at most this many stacked numbers per batched decomposition (256 MiB of float32): bounds the extra memory
BATCH_NUMBERS = 1 << 26


def weight_entries(layer: AdapterLayer) -> int:
    """``out x in``: the numbers a layer stacks when its batched input is its weight."""
    return layer.out_features * layer.in_features


def same_shape_chunks(
    layers: Iterable[AdapterLayer], entries: Callable[[AdapterLayer], int] = weight_entries
) -> Iterator[list[AdapterLayer]]:
    """Layers with the same weight shape, device and rank, two or more, in chunks of at most
    :data:`BATCH_NUMBERS` stacked numbers (``entries(layer)`` per layer; the options are the same
    for every layer of one ``adapt``)."""
    groups: dict[tuple, list[AdapterLayer]] = {}
    for layer in layers:
        key = (layer.out_features, layer.in_features, str(layer.factory["device"]), layer.rank)
        groups.setdefault(key, []).append(layer)
    for members in groups.values():
        if len(members) < 2:
            continue
        size = max(1, BATCH_NUMBERS // entries(members[0]))
        for first in range(0, len(members), size):
            yield members[first:first + size]


def prefetch_batched(
    layers: Iterable[AdapterLayer],
    inputs: Callable[[AdapterLayer], tuple[torch.Tensor, ...]],
    decompose: Callable[..., tuple[torch.Tensor, ...]],
    entries: Callable[[AdapterLayer], int] = weight_entries,
) -> None:
    """For each chunk of :func:`same_shape_chunks` (``entries(layer)``: the numbers of the layer's
    ``inputs``): stack every layer's ``inputs(layer)`` and run ``decompose(first_layer, *stacked)``
    once; each layer's :func:`take_prefetched` then returns its slice of the results. A chunk whose
    decomposition fails (:class:`SVDFailure`, ValueError) is left to the layers, whose own
    decomposition names the layer in its error."""
    for chunk in same_shape_chunks(layers, entries):
        stacked = [torch.stack(tensors) for tensors in zip(*(inputs(layer) for layer in chunk))]
        try:
            results = decompose(chunk[0], *stacked)
        except (SVDFailure, ValueError):
            continue
        for index, layer in enumerate(chunk):
            layer.prefetched = tuple(result[index].clone() for result in results)  # own memory


def take_prefetched(layer: AdapterLayer) -> tuple[torch.Tensor, ...] | None:
    """The layer's share of :func:`prefetch_batched` (once), or None when it was not batched."""
    return layer.__dict__.pop("prefetched", None)


def principal_triplets(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` ``U_r, S_r, Vh_r`` of the layer's weight in float32, on its device (the ones
    :func:`prefetch_principal_triplets` computed in a batch, when it did)."""
    prefetched = take_prefetched(layer)
    if prefetched is not None:
        return prefetched
    try:
        return truncated_svd(layer.base_weight(), layer.rank, niter=layer.options["niter"])
    except SVDFailure as exc:
        raise layer.error(f"cannot take the SVD of the weight ({exc}); check the model's weights") from None


def prefetch_principal_triplets(layers: dict[str, AdapterLayer]) -> None:
    """The top-``rank`` SVDs of every weight, same-shape weights stacked into batched calls
    (:func:`prefetch_batched`); each layer's :func:`principal_triplets` then returns its share."""
    prefetch_batched(
        layers.values(),
        lambda layer: (layer.base_weight(),),
        lambda first, weights: truncated_svd(weights, first.rank, niter=first.options["niter"]),
    )


class BatchedPrincipalInit:
    """Mixin of the inits built on :func:`principal_triplets`: their SVDs run batched over
    same-shape layers (``AdapterLayer.prepare_initialization``)."""

    @classmethod
    def prepare_initialization(cls, layers: dict[str, AdapterLayer], stats: dict) -> None:
        prefetch_principal_triplets(layers)


class LoraRewriteLayer(LoraShapedLayer):
    """LoRA-shaped rewrite: trainable ``lora_A`` (r x in) and ``lora_B`` (out x r) start at the
    buffers ``A0`` / ``B0``; the update is ``s B A`` with ``s = alpha / r`` and the base offset
    ``s B0 A0``. Subclasses compute the initial factors in :meth:`initialize` and hand them to
    :meth:`start_from`."""

    rewrites_base = True

    def __init__(self, base: nn.Module, rank: int, alpha: float, **options: Any) -> None:
        super().__init__(base, rank, alpha, **options)
        self.register_buffer("A0", torch.empty(self.rank, self.in_features, **self.factory))
        self.register_buffer("B0", torch.empty(self.out_features, self.rank, **self.factory))

    def start_from(self, b0: torch.Tensor, a0: torch.Tensor) -> None:
        """Store the initial factors (cast to the weight's dtype) and start the trainable ones there."""
        with torch.no_grad():
            self.A0.copy_(a0)
            self.B0.copy_(b0)
            self.lora_A.copy_(self.A0)
            self.lora_B.copy_(self.B0)

    def base_offset(self) -> torch.Tensor:
        """``s B0 A0`` in float32 (the residual ``W - offset`` is then rounded once, to the weight's dtype)."""
        up, down = self.base_offset_factors()
        return up @ down

    def base_offset_factors(self) -> Factors:
        """``(s B0, A0)`` in float32."""
        return self.scaling * self.B0.float(), self.A0.float()
