"""WeLore: data-free, non-uniform rank reduction from the heavy-tailed spectra low-rank gradients leave.

Paper: Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from
Low-Rank Gradients", arXiv 2407.11239. Layers whose gradients were low-rank during
training end with heavy-tailed singular values and compress well; others do not. WeLore
normalises each matrix's singular values to [0, 1], drops those below ONE global threshold
(so ranks differ per layer), keeps the matrices that lose enough ranks as two factors -- the
low-rank components (LRC) -- and leaves the others (N-LRC) dense and untouched:

    s_hat = (s - s_min) / (s_max - s_min),   p_l = #{s_hat < tau},   k_l = min(m, n) - p_l,
    LRC:  W_l ~ (U_k S_k^{1/2}) (S_k^{1/2} V_k^T)      (the truncated SVD, data-free)

The rule is the ``"welore"`` allocation of :mod:`rankwise.compress.allocation` (this method's
default; any other method can use it too), where ``tau`` is searched to meet ``ratio`` in
stored weights (the release takes it from a hand-tuned table and counts singular values;
the singular-value reduction is reported as ``allocation_info["singular_value_reduction"]``).
Option ``min_ratio``: a matrix is an LRC only if ``p_l / min(m, n) > min_ratio`` (the release:
0.0 when compressing, 0.4999 before fine-tuning); None (default) requires only that its
factors are worth storing (fewer weights and, with ``keep_dense_above``, faster), which for a
square matrix is the release's fine-tuning value.

Fine-tuning only the LRCs (N-LRCs frozen) is :func:`rankwise.compress.trainable_lrc`.
Deviations: the release touches only LLaMA's ``*_proj`` layers of LLaMA-2 checkpoints; here
any targeted Linear or Conv1D layer of any model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.calibration import LayerStatistics
from rankwise.compress.core import COMPRESSORS, Compressor
from rankwise.layers import dense_weight
from rankwise.linalg.lowrank import split_singular_values
from rankwise.linalg.svd import truncated_svd
from rankwise.options import Option


@COMPRESSORS.register(
    "welore",
    family="svd",
    paper="From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients",
    arxiv="2407.11239",
)
class WeLoreCompressor(Compressor):
    """Truncated SVD at the ranks of WeLore's global normalised-spectrum threshold."""

    OPTIONS = {
        "min_ratio": Option(None, float, low=0, high=1, high_open=True, nullable=True,
                            help="a matrix is a low-rank component only if it drops more than this share of its "
                                 "ranks; None = whenever its factors are worth storing"),
    }
    default_allocation = "welore"

    def allocation_options(self) -> dict[str, Any]:
        return {"min_ratio": self.options["min_ratio"]}

    def factorize(
        self, name: str, layer: nn.Module, rank: int, stats: LayerStatistics | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return split_singular_values(*truncated_svd(dense_weight(layer), rank))
