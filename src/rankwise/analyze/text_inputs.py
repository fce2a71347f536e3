"""Running a model on text for the representation diagnostics: token ids, eval mode, eager attention.

Shared by :mod:`rankwise.analyze.attention` and :mod:`rankwise.analyze.representations`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from rankwise.errors import RankwiseError


def token_ids(text: str | torch.Tensor | list[int], tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """1-D token ids of ``text`` (a string, encoded by ``tokenizer`` without special tokens, or ids),
    the first ``max_tokens`` of them when given."""
    if isinstance(text, str):
        if tokenizer is None:
            raise RankwiseError(
                "text given as a string needs tokenizer=...; for the embedded base pass "
                "rankwise.data.tokenizer.get_tokenizer(), for a model directory AutoTokenizer.from_pretrained(dir)"
            )
        limit = {} if max_tokens is None else {"truncation": True, "max_length": max_tokens}
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", **limit)["input_ids"][0]
    else:
        ids = torch.as_tensor(text)[:max_tokens]
    if ids.ndim != 1 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
        raise RankwiseError(f"expected a non-empty text or 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids.long()


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@contextlib.contextmanager
def inference(model: nn.Module, *, eager_attention: bool = False) -> Iterator[torch.device]:
    """Eval mode and no grad (and eager attention, which returns the attention weights), all
    restored afterwards; yields the model's device."""
    was_training = model.training
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = eager_attention and previous not in (None, "eager")
    if switch:
        if not hasattr(model, "set_attn_implementation"):
            raise RankwiseError(f"cannot switch {type(model).__name__} to eager attention to read its weights")
        model.set_attn_implementation("eager")
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)
        if switch:
            model.set_attn_implementation(previous)
