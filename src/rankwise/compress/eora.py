"""EoRA: training-free compensation of a compressed weight in the eigenspace of its inputs.

Paper: Liu et al., "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace
Low-Rank Approximation", arXiv 2410.21271. Given the original weight ``W`` and the compressed
one ``W_c`` (quantized, pruned or factorised) of a layer, the error ``D = W - W_c`` is
approximated at rank ``r`` where the layer's inputs live, not in plain Frobenius norm:

    C = E[x x^T] = Q Lambda Q^T,   D Q Lambda^{1/2} = U S V^T,
    B = U_r S_r^{1/2},   A = S_r^{1/2} V_r^T Lambda^{-1/2} Q^T,

so ``W ~ W_c + B A`` and ``B A`` minimises ``||(D - B A) X||_F`` over rank-``r`` matrices
(:meth:`rankwise.compress.whitening.Whitening.eigen`: non-positive eigenvalues raised to the
smallest positive one, as the release clamps them). ``x`` are the inputs of the layer in the
COMPRESSED model (what it sees at inference). Shipped as a LoRA adapter ``lora_B = B``,
``lora_A = A`` with ``lora_alpha = r`` (scaling 1), as GPTQModel ships EoRA.

Deviation: the release accumulates ``C`` as a running mean during GPTQ's sequential
quantization; here it is the mean over the calibration batches in one pass over the
already-compressed model (the same statistic when the model was compressed in one go).
Defaults of the releases: rank 32 (docs) to 128, 256-1024 calibration samples.
"""

from __future__ import annotations

import torch

from rankwise.compress.compensate import COMPENSATORS
from rankwise.compress.whitening import Whitening, weighted_truncation


@COMPENSATORS.register(
    "eora",
    family="eigenspace",
    paper="EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation",
    arxiv="2410.21271",
    needs_data=True,
)
def eora_correction(error: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` (float64): the rank-``rank`` minimiser of ``||(error - B A) X||_F`` for inputs of Gram ``gram``."""
    up, down, _ = weighted_truncation(error, rank, columns=Whitening.eigen(gram))
    return up, down
