"""What the gradient-SVD inits share (LoRA-GA, LoRA-SB): the layer's full-weight gradient and its SVD.

Both methods collect ``G = mean_b dL_b/dW`` (statistic ``weight_gradient``, see
:mod:`rankwise.calibration`) and initialise their factors from the top singular triplets
of a matrix derived from it: ``G`` itself (LoRA-GA, ``2r`` triplets) or the first update it
implies (LoRA-SB, ``r`` triplets). :class:`GradientSVDInit` computes them; the SVDs of
same-shape layers run as one batched call per shape (chunks of at most
:data:`rankwise.adapters.rewrite.BATCH_NUMBERS` entries), on the weights' device, exact or
randomized as the layer's ``niter`` says -- the same triplets as the layer-by-layer SVDs.
"""

from __future__ import annotations

import torch

from rankwise.adapters.base import AdapterLayer
from rankwise.adapters.rewrite import prefetch_batched, take_prefetched
from rankwise.calibration import LayerStatistics
from rankwise.linalg.svd import SVDFailure, truncated_svd


def collected_gradient(layer: AdapterLayer, stats: LayerStatistics | None) -> torch.Tensor:
    """The layer's collected weight gradient (fp32, on the weight's device); refuses a missing or zero one."""
    gradient = stats.weight_gradient if stats is not None else None
    if gradient is None:
        raise layer.error("no weight gradient was collected for this layer; pass data with labels")
    if not torch.any(gradient != 0):
        raise layer.error("the loss does not depend on this layer's weight (its gradient is zero); exclude it")
    return gradient.to(layer.factory["device"], torch.float32)


class GradientSVDInit:
    """Mixin of an :class:`~rankwise.adapters.base.AdapterLayer` whose init decomposes
    :meth:`svd_matrix` of the collected gradient for its top :meth:`svd_rank` triplets."""

    def svd_matrix(self, gradient: torch.Tensor) -> torch.Tensor:
        """The gradient-derived matrix whose SVD the init needs (default: ``G`` itself)."""
        return gradient

    def svd_rank(self) -> int:
        """How many top triplets the init needs (default: the layer's rank)."""
        return self.rank

    @classmethod
    def prepare_initialization(cls, layers: dict[str, AdapterLayer], stats: dict) -> None:
        names = {id(layer): name for name, layer in layers.items()}
        prefetch_batched(
            layers.values(),
            lambda layer: (layer.svd_matrix(collected_gradient(layer, stats.get(names[id(layer)]))),),
            lambda first, matrices: truncated_svd(matrices, first.svd_rank(), niter=first.options["niter"]),
        )

    def gradient_triplets(self, stats: LayerStatistics | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-:meth:`svd_rank` ``U, S, Vh`` of :meth:`svd_matrix` (fp32; the batched ones when
        :meth:`prepare_initialization` computed them; randomized when the layer's ``niter`` is set)."""
        prefetched = take_prefetched(self)
        if prefetched is not None:
            return prefetched
        matrix = self.svd_matrix(collected_gradient(self, stats))
        try:
            return truncated_svd(matrix, self.svd_rank(), niter=self.options["niter"])
        except SVDFailure as exc:
            raise self.error(f"cannot decompose the weight gradient ({exc}); check the data for inf/nan losses") from None
