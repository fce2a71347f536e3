"""SVD-LLM: truncation-aware whitening, the optional closed-form update, and v2's eigen truncation.

Paper: Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language
Model Compression", arXiv 2403.07378. Plain SVD minimises the weight error, not the output
error; SVD-LLM whitens the weight by the inputs' Gram matrix first, so that each dropped
singular value costs exactly its own share of the output error. With
``C = sum_t x_t x_t^T = S S^T`` (Cholesky, float64; jitter when C is not positive definite,
:class:`~rankwise.compress.whitening.Whitening`),

    W S = U Sigma V^T,   up = U_k Sigma_k^{1/2},   down = Sigma_k^{1/2} V_k^T S^{-1},
    ||(W - up down) X||_F = ||(W - up down) S||_F = sqrt(sum_{i>k} sigma_i^2),

the rank-``k`` minimiser of the output error on the calibration inputs.

Options:
- ``whitening``: ``"cholesky"`` (SVD-LLM) or ``"eigen"`` -- SVD-LLM v2's loss-optimised
  truncation (Wang et al., "SVD-LLM V2: Optimizing Singular Value Truncation for Large
  Language Model Compression", arXiv 2503.12340): the square root ``S = Q Lambda^{1/2}`` from
  the eigendecomposition (the SVD) of ``C`` instead of its Cholesky factor, which reaches the
  same minimum without Cholesky's failures on ill-conditioned ``C``.
- ``refit``: SVD-LLM's parameter update after truncation: with ``down`` fixed, ``up`` is
  re-solved in closed form, ``up = W C' down^T (down C' down^T)^{-1}``, the least-squares fit
  of the original layer's outputs ``W x'`` on the inputs ``x'`` the layer receives in the
  *compressed* model (``C' = sum x' x'^T``, one extra pass over the data after every layer is
  replaced). On the uncompressed model's inputs it would change nothing (the truncation is
  already optimal there); it corrects the drift of the inputs that earlier compressed layers
  cause. Default False (the release's whitening-only step).

Deviations. The release's update runs layer by layer, each fitted on inputs from the
already-updated earlier layers; here all factorised layers are refitted from one pass
through the compressed, not yet refitted model (the same fit, one pass instead of one per
layer). The release adds an absolute ``1e-6`` to a non-positive-definite ``C``; here the
jitter is relative to C's mean diagonal. SVD-LLM v2's other refinement, the heterogeneous
per-type ratio allocation from each matrix's theoretical truncation loss, is
``allocation="svd_llm_v2"`` (:mod:`rankwise.compress.allocation`; any method can use it, and
SVD-LLM v2 as published is ``whitening="eigen", allocation="svd_llm_v2"``). Ratio: the release's ``--ratio`` is also the fraction of parameters KEPT
(its help text says otherwise, issues 16 and 22 of AIoT-MLSys-Lab/SVD-LLM).
Defaults of the release: 256 whitening samples of 2048 tokens (WikiText-2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rankwise.calibration import LayerStatistics, collect_layer_inputs
from rankwise.compress.core import COMPRESSORS, Compressor
from rankwise.compress.whitening import Whitening, gram_of, weighted_truncation
from rankwise.layers import dense_weight
from rankwise.linalg.covariance import CovarianceAccumulator
from rankwise.nn import FactorizedLinear
from rankwise.options import Option

if TYPE_CHECKING:
    from rankwise.compress.core import CompressionJob


def refit_up(weight: torch.Tensor, down: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``W C down^T (down C down^T)^{-1}`` (float64): the least-squares ``up`` for fixed ``down``."""
    weight, down, gram = (t.to(torch.float64) for t in (weight, down, gram))
    inner = down @ gram @ down.T
    inner = inner + 1e-12 * torch.diagonal(inner).mean().clamp_min(1e-300) * torch.eye(
        inner.shape[0], dtype=inner.dtype, device=inner.device)
    return torch.linalg.solve(inner, (weight @ gram @ down.T).T).T


@COMPRESSORS.register(
    "svd_llm",
    family="svd",
    paper="SVD-LLM: Truncation-aware Singular Value Decomposition for Large Language Model Compression",
    arxiv="2403.07378",
    needs_data=True,
)
class SVDLLMCompressor(Compressor):
    """Truncated SVD of ``W S`` with ``C = S S^T`` (Cholesky or eigen), optionally ``up`` refitted."""

    OPTIONS = {
        "whitening": Option("cholesky", str, choices=("cholesky", "eigen"),
                            help="square root of the input Gram matrix: cholesky (SVD-LLM) or eigen (SVD-LLM v2)"),
        "refit": Option(False, bool, help="re-solve up by least squares on the compressed model's inputs"),
    }
    calibration = ("input_covariance",)

    def whitening(self, stats: LayerStatistics) -> Whitening:
        gram = gram_of(stats.input_covariance)
        return Whitening.cholesky(gram) if self.options["whitening"] == "cholesky" else Whitening.eigen(gram)

    def factorize(
        self, name: str, layer: nn.Module, rank: int, stats: LayerStatistics | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        up, down, _ = weighted_truncation(dense_weight(layer), rank, columns=self.whitening(stats))
        return up, down

    def refit(self, model: nn.Module, swapped: dict[str, tuple[nn.Module, nn.Module]], job: "CompressionJob") -> None:
        if not self.options["refit"]:
            return
        factorised = {name: pair for name, pair in swapped.items() if isinstance(pair[1], FactorizedLinear)}
        grams = collect_layer_inputs(
            model, list(factorised), job.data,
            lambda m: CovarianceAccumulator(m.in_features, dtype=torch.float64))
        with torch.no_grad():
            for name, (original, layer) in factorised.items():
                up = refit_up(dense_weight(original), layer.down.weight, gram_of(grams[name]))
                layer.up.weight.copy_(up.to(layer.up.weight.dtype))
