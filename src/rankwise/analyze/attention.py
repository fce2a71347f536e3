"""External entanglement: the entanglement profile of an attention matrix on a text.

Paper: "Artificial Entanglement in the Fine-Tuning of Large Language Models", arXiv
2601.06788 (attention matrices follow an area law with logarithmic corrections, an
"attention Cardy formula"). The paper does not say how it turns an attention matrix into a
state; here it is the same reading as for weights (:mod:`rankwise.analyze.entanglement`):

    A = softmax(Q K^T / sqrt(d) + mask)      (T x T, head ``head`` of layer ``layer``)

taken from the model's own forward pass with eager attention (the implementation that
returns the weights; the model's setting is restored afterwards), in eval mode, for the
first ``length`` tokens of the text; ``A`` is then sited by its row and column factors
(``length`` defaults to the largest power of two not above the number of tokens and the
model's positions, so that every site has dimension 2) and profiled with
:func:`~rankwise.analyze.entanglement.entanglement_profile`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from rankwise.analyze.entanglement import EntanglementProfile, entanglement_profile
from rankwise.analyze.text_inputs import inference, max_positions, token_ids
from rankwise.errors import RankwiseError


def attention_matrices(model: nn.Module, text: str | torch.Tensor, *, tokenizer: Any = None,
                       length: int | None = None) -> torch.Tensor:
    """Every layer's and head's attention probabilities on the first ``length`` tokens of ``text``:
    a float32 tensor ``(layers, heads, length, length)`` from one forward pass."""
    ids = token_ids(text, tokenizer, max_positions(model))
    limit = min(ids.numel(), max_positions(model) or ids.numel())
    if length is None:
        length = 1 << (limit.bit_length() - 1)
    if isinstance(length, bool) or not isinstance(length, int) or not 4 <= length <= limit:
        raise RankwiseError(f"length must be an integer in [4, {limit}] (the tokens available), got {length!r}; "
                            "give a longer text")
    with inference(model, eager_attention=True) as device:
        outputs = model(input_ids=ids[:length].unsqueeze(0).to(device), output_attentions=True)
    attentions = getattr(outputs, "attentions", None)
    if not attentions:
        raise RankwiseError(f"{type(model).__name__} returned no attention weights (output_attentions=True)")
    return torch.stack([a[0].float() for a in attentions])


def attention_matrix(model: nn.Module, text: str | torch.Tensor, layer: int, head: int, *,
                     tokenizer: Any = None, length: int | None = None) -> torch.Tensor:
    """The ``length x length`` attention probabilities of ``head`` in ``layer`` on ``text`` (float32)."""
    matrices = attention_matrices(model, text, tokenizer=tokenizer, length=length)
    layers, heads = matrices.shape[:2]
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
        raise RankwiseError(f"layer must be an integer in [0, {layers - 1}], got {layer!r}")
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
        raise RankwiseError(f"head must be an integer in [0, {heads - 1}], got {head!r}")
    return matrices[layer, head]


def attention_entanglement(
    model: nn.Module,
    text: str | torch.Tensor,
    layer: int,
    head: int,
    *,
    tokenizer: Any = None,
    length: int | None = None,
    row_factors: Sequence[int] | None = None,
    col_factors: Sequence[int] | None = None,
    layout: str = "rows_then_columns",
) -> EntanglementProfile:
    """Entanglement profile of the attention matrix of ``head`` in ``layer`` (0-based) on ``text``
    (a string, with ``tokenizer``, or token ids); see the module docstring."""
    matrix = attention_matrix(model, text, layer, head, tokenizer=tokenizer, length=length)
    return entanglement_profile(matrix, row_factors=row_factors, col_factors=col_factors, layout=layout)
