"""Plain truncated SVD -- the data-free baseline of low-rank LLM compression.

Paper: Kaushal, Vaidhya & Rish, "LORD: Low Rank Decomposition Of Monolingual Code LLMs For
One-Shot Compression", arXiv 2309.14021. Each targeted weight ``W`` (out x in) is replaced
by its best rank-``k`` approximation in Frobenius and spectral norm (Eckart-Young-Mirsky),

    W ~ W_k = U_k S_k V_k^T = (U_k sqrt(S_k)) (sqrt(S_k) V_k^T) = up @ down,

so ``||W - W_k||_F^2 = sum_{i>k} s_i^2`` and ``||W - W_k||_2 = s_{k+1}``. The SVD runs in
float32 (float64 for float64 weights) through :mod:`rankwise.linalg`; factors are written
back in the weight's dtype. The bias is kept as is.

Options: ``niter`` (default None = exact thin SVD; an integer uses the randomized SVD of
Halko et al. with that many power iterations, for large layers) and ``seed`` (for the
randomized sketch). Deviation from LoRD: LoRD picks ranks per layer by a search on code
perplexity; here the ranks come from the allocation (default ``"uniform"``: every layer keeps
the rank its share of ``ratio`` allows; ``"sensitivity"`` is the closest to LoRD's search; see
:mod:`rankwise.compress.allocation`).
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.calibration import LayerStatistics
from rankwise.common_options import NITER
from rankwise.compress.core import COMPRESSORS, Compressor
from rankwise.layers import dense_weight
from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import truncated_svd
from rankwise.options import Option


@COMPRESSORS.register(
    "svd",
    family="svd",
    paper="LORD: Low Rank Decomposition Of Monolingual Code LLMs For One-Shot Compression",
    arxiv="2309.14021",
)
class SVDCompressor(Compressor):
    """``up = U_k sqrt(S_k)``, ``down = sqrt(S_k) V_k^T`` of the weight itself."""

    OPTIONS = {
        "niter": NITER,
        "seed": Option(0, int, help="seed of the randomized SVD's sketch (used when niter is set)"),
    }

    def factorize(
        self, name: str, layer: nn.Module, rank: int, stats: LayerStatistics | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        niter = self.options["niter"]
        generator = torch.Generator().manual_seed(self.options["seed"]) if niter is not None else None
        return split_singular_values(*truncated_svd(dense_weight(layer), rank, niter=niter, generator=generator))
