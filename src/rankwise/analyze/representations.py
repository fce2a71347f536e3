"""Matrix Nuclear-Norm: how much a model's final representations of a text spread over directions.

Paper: Li, Xia, Chang & Wu, "Large Language Model Evaluation via Matrix Nuclear-Norm", arXiv
2410.10672. The nuclear norm ``||A||_* = sum sigma_k`` of the representation matrix is a
convex proxy of its rank (discriminability and diversity); the paper replaces the SVD by the
``L_{1,2}`` norm, the sum of the column norms, which needs one pass over ``A``:

    H       final hidden states of every token of every text       (N x d)
    A_c     H with each column centred (its mean over the N tokens subtracted)
    A       A_c with each row scaled to unit L2 norm
    score = sum of the D largest column norms ||A[:, j]||_2,  D = min(N, d)

Each text runs on its own (no padding enters ``H``), truncated to ``max_length`` tokens.
Since every rank-one column piece ``A[:, j] e_j^T`` has nuclear norm ``||A[:, j]||_2``, the
score with ``D = d`` bounds the exact ``||A||_*`` from above (triangle inequality); the result
carries the exact value too, for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from rankwise.analyze.text_inputs import inference, max_positions, token_ids
from rankwise.errors import RankwiseError


@dataclass(frozen=True)
class MatrixNuclearNorm:
    """The score (``float()`` of this), the exact nuclear norm of the same ``A``, and ``N``, ``d``."""

    score: float
    nuclear_norm: float
    num_tokens: int
    hidden_size: int

    def __float__(self) -> float:
        return self.score


def nuclear_norm_proxy(hidden: torch.Tensor) -> MatrixNuclearNorm:
    """The Matrix Nuclear-Norm score of a representation matrix ``hidden`` (N tokens x d), as in the
    module docstring. RankwiseError when a centred row is zero (a token identical to the mean)."""
    if hidden.ndim != 2 or hidden.shape[0] < 2:
        raise RankwiseError(f"expected hidden states of shape (tokens >= 2, d), got {tuple(hidden.shape)}")
    centred = hidden.detach().double() - hidden.detach().double().mean(dim=0, keepdim=True)
    row_norms = centred.norm(dim=1, keepdim=True)
    if (row_norms <= 0).any():
        raise RankwiseError("a token's centred representation is zero; the rows cannot be normalised "
                            "(pass more varied text)")
    normalised = centred / row_norms
    count = min(normalised.shape)
    column_norms = normalised.norm(dim=0).sort(descending=True).values
    return MatrixNuclearNorm(
        score=float(column_norms[:count].sum()),
        nuclear_norm=float(torch.linalg.svdvals(normalised).sum()),
        num_tokens=int(hidden.shape[0]),
        hidden_size=int(hidden.shape[1]),
    )


def final_hidden_states(model: nn.Module, texts: Sequence[str | torch.Tensor], *, tokenizer: Any = None,
                        max_length: int = 128) -> torch.Tensor:
    """The last layer's hidden states of every token of every text, stacked (N x d, float32)."""
    if isinstance(texts, (str, torch.Tensor)) or not texts:
        raise RankwiseError("texts must be a non-empty list of strings (or of token-id sequences)")
    limit = min(max_length, max_positions(model) or max_length)
    states = []
    with inference(model) as device:
        for text in texts:
            ids = token_ids(text, tokenizer, limit)
            outputs = model(input_ids=ids.unsqueeze(0).to(device), output_hidden_states=True)
            states.append(outputs.hidden_states[-1][0].float().cpu())
    return torch.cat(states)


def matrix_nuclear_norm(model: nn.Module, texts: Sequence[str | torch.Tensor], *, tokenizer: Any = None,
                        max_length: int = 128) -> MatrixNuclearNorm:
    """The Matrix Nuclear-Norm score of ``model`` on ``texts`` (strings with ``tokenizer``, or token ids)."""
    return nuclear_norm_proxy(final_hidden_states(model, texts, tokenizer=tokenizer, max_length=max_length))
