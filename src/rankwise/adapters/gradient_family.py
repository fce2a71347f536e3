"""What the gradient-SVD inits share (LoRA-GA, LoRA-SB): the layer's full-weight gradient and its SVD.

Both methods collect ``G = mean_b dL_b/dW`` (statistic ``weight_gradient``, see
:mod:`rankwise.calibration`) and initialise their factors from the top singular triplets
of ``G`` (LoRA-GA) or of the first update it implies (LoRA-SB).
"""

from __future__ import annotations

import torch

from rankwise.adapters.base import AdapterLayer
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


def top_triplets(
    layer: AdapterLayer, matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` ``U, S, Vh`` of a gradient-derived ``matrix`` (randomized when the layer's ``niter`` is set)."""
    try:
        return truncated_svd(matrix, rank, niter=layer.options["niter"])
    except SVDFailure as exc:
        raise layer.error(f"cannot decompose the weight gradient ({exc}); check the data for inf/nan losses") from None
