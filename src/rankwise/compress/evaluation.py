"""Judging a compressed model the way ``rankwise compress`` and the compress bench suite report it.

- Quality on held-out text: **perplexity** ``exp(mean next-token loss)`` for causal language
  models (:func:`rankwise.training.evaluate`), **hidden-state cosine fidelity** for encoders:
  the mean over (non-padding) tokens of ``cos(h_compressed, h_original)`` of the last hidden
  state (1 = the original's outputs).
- Batches from text for any tokenizer: causal LMs take windows of the document stream
  (``[bos] doc eos ...``, :mod:`rankwise.data.batches`); encoders take ``[CLS] window [SEP]``
  windows of ``seq_len`` tokens of the documents joined by ``[SEP]`` (no labels).
- :func:`contrastive_loss`: a loss for an encoder that has none, for FWSVD's Fisher and the
  sensitivity allocation: InfoNCE (temperature 0.05) between the mean-pooled embeddings of the
  two halves of each window, the other windows of the batch as negatives -- adjacent text
  should embed close, the objective sentence encoders are trained for.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import RankwiseError

CONTRASTIVE_TEMPERATURE = 0.05


def is_causal_lm(model: nn.Module) -> bool:
    """A model with an output head over the vocabulary (``get_output_embeddings()``)."""
    head = getattr(model, "get_output_embeddings", None)
    return callable(head) and head() is not None


def parameter_count(model: nn.Module) -> int:
    """Parameters and persistent buffers excluded; each shared tensor once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def causal_batches(documents: Sequence[str], tokenizer, *, seq_len: int, batch_size: int,
                   max_batches: int | None) -> list[dict[str, torch.Tensor]]:
    from rankwise.data.batches import encode_documents, eval_batches

    return eval_batches(encode_documents(list(documents), tokenizer), batch_size=batch_size, seq_len=seq_len,
                        max_batches=max_batches)


def encoder_batches(documents: Sequence[str], tokenizer, *, seq_len: int, batch_size: int,
                    max_batches: int | None) -> list[dict[str, torch.Tensor]]:
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise RankwiseError("the encoder's tokenizer has no [CLS] / [SEP] tokens; rankwise builds encoder batches "
                            "as [CLS] window [SEP]")
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids + [sep])
    width = seq_len - 2
    windows = len(stream) // width
    if windows == 0:
        raise RankwiseError(f"the text has {len(stream)} tokens, fewer than seq_len={seq_len}; give more text")
    wanted = windows if max_batches is None else min(windows, max_batches * batch_size)
    starts = [int(i * windows / wanted) * width for i in range(wanted)]
    rows = torch.tensor([[cls] + stream[s:s + width] + [sep] for s in starts])
    return [{"input_ids": rows[i:i + batch_size], "attention_mask": torch.ones_like(rows[i:i + batch_size])}
            for i in range(0, wanted, batch_size)]


def text_batches(model: nn.Module, documents: Sequence[str], tokenizer, **kwargs: Any) -> list[dict[str, torch.Tensor]]:
    """Batches of ``documents`` for ``model``: causal windows with labels, or encoder windows."""
    return (causal_batches if is_causal_lm(model) else encoder_batches)(documents, tokenizer, **kwargs)


def _last_hidden(output: Any) -> torch.Tensor:
    hidden = output.get("last_hidden_state") if isinstance(output, dict) else getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise RankwiseError("the model returns no last_hidden_state; hidden-state fidelity needs an encoder output")
    return hidden


@torch.no_grad()
def hidden_states(model: nn.Module, batches: Sequence[dict]) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return [_last_hidden(model(**batch)).float() for batch in batches]
    finally:
        model.train(was_training)


def hidden_fidelity(model: nn.Module, batches: Sequence[dict], reference: Sequence[torch.Tensor]) -> float:
    """Mean per-token cosine of ``model``'s last hidden states with ``reference`` (the original's)."""
    total, count = 0.0, 0
    for batch, ref, out in zip(batches, reference, hidden_states(model, batches)):
        cosine = F.cosine_similarity(out, ref, dim=-1)
        mask = batch.get("attention_mask", torch.ones(cosine.shape)).to(cosine.dtype)
        total += float((cosine * mask).sum())
        count += float(mask.sum())
    return total / count


def perplexity(model: nn.Module, batches: Sequence[dict]) -> float:
    from rankwise.training import evaluate

    loss = evaluate(model, batches)
    return math.exp(loss) if loss < 700 else math.inf


def contrastive_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """InfoNCE between the mean-pooled halves of each window (see the module docstring)."""
    hidden = _last_hidden(model(**batch))
    half = hidden.shape[1] // 2
    first = F.normalize(hidden[:, :half].mean(dim=1), dim=-1)
    second = F.normalize(hidden[:, half:].mean(dim=1), dim=-1)
    logits = first @ second.T / CONTRASTIVE_TEMPERATURE
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))
