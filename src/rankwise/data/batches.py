"""Token streams and batches for causal language modelling.

Documents are tokenised and concatenated into one 1-D stream, each document closed by the
tokenizer's separator -- its end-of-sequence token, else its ``[SEP]`` token (BERT-style
encoders have no EOS), else nothing -- and opened by its BOS token when it has a distinct one
(else by ``[CLS]`` when it has one), so a window may cross a document boundary exactly as in
GPT-style pretraining.

* :class:`TokenBatches` -- an endless iterator of random windows ``tokens[s : s + T]``,
  ``s ~ Uniform{0, ..., N - T}``, drawn with its own ``torch.Generator``: the sequence depends
  only on the seed and can be saved and resumed with ``state_dict`` / ``load_state_dict``.
* :func:`eval_batches` -- fixed non-overlapping windows spread evenly over the stream.
* :class:`MaskedBatches` / :func:`masked_eval_batches` -- the same windows with BERT's masking
  (arXiv 1810.04805): 15% of the non-special positions are chosen, 80% of them replaced by the
  mask token, 10% by a random token, 10% left as they are; ``labels`` hold the original token at
  the chosen positions and -100 elsewhere (the masked-LM and hidden-state objectives of
  :mod:`rankwise.training`).

``labels`` equal ``input_ids``: ``transformers`` causal LMs shift them internally, so the loss
is the mean of ``-log p(x_{t+1} | x_{<=t})`` over the ``T - 1`` predicted tokens of each row.
The token streams of the embedded corpus are cached as ``.npy`` (no pickles) per tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rankwise.cache import cache_dir
from rankwise.data._cache import save_array_atomic
from rankwise.data.corpus import PARTS, SPLITS, corpus_fingerprint, load_corpus, split_documents
from rankwise.errors import RankwiseError

_ENCODE_CHUNK = 256  # documents per tokenizer call: bounded memory, parallel inside the fast tokenizer


def separator_ids(tokenizer) -> tuple[list[int], list[int]]:
    """``(prefix, suffix)``: the token ids put before and after every document.

    Suffix: the EOS token, else the ``[SEP]`` token, else none. Prefix: the BOS token when it is
    distinct from the suffix, else the ``[CLS]`` token when there is one, else none.
    """
    eos, sep = tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)
    closing = eos if eos is not None else sep
    bos, cls = tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None)
    opening = bos if bos is not None and bos != closing else (cls if cls is not None and cls != closing else None)
    return ([] if opening is None else [opening]), ([] if closing is None else [closing])


def _tokenizer_digest(tokenizer) -> str | None:
    """Hash identifying a fast tokenizer's behaviour (its JSON plus the special ids we insert)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    hasher = hashlib.sha256(backend.to_str().encode("utf-8"))
    prefix, suffix = separator_ids(tokenizer)
    hasher.update(f"prefix={prefix};suffix={suffix}".encode())
    return hasher.hexdigest()[:12]


def _embedded_part(documents: Sequence[str]) -> tuple[str, str] | None:
    """``(split, part)`` if ``documents`` are exactly one part of the embedded corpus."""
    for split in SPLITS:
        for part in PARTS:
            candidate = load_corpus(split, part)
            if len(candidate) == len(documents) and candidate == list(documents):
                return split, part
    return None


def _encode(documents: Sequence[str], tokenizer) -> np.ndarray:
    prefix, suffix = separator_ids(tokenizer)
    stream: list[int] = []
    for start in range(0, len(documents), _ENCODE_CHUNK):
        chunk = list(documents[start : start + _ENCODE_CHUNK])
        # verbose=False: documents are longer than model_max_length; windows cut them later.
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(prefix)
            stream.extend(ids)
            stream.extend(suffix)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    return np.asarray(stream, dtype=dtype)


def encode_documents(documents: Sequence[str], tokenizer) -> torch.Tensor:
    """Tokenise ``documents`` into one 1-D ``LongTensor``: ``[bos] doc_1 eos [bos] doc_2 eos ...``
    (separators: :func:`separator_ids`).

    When ``documents`` are one part of the embedded corpus and the tokenizer is a fast one, the
    stream is cached in ``cache_dir()/tokens-<tokenizer hash>-<corpus fingerprint>/<split>-<part>.npy``.
    """
    if isinstance(documents, str):
        raise RankwiseError("encode_documents takes a list of documents, not one string; wrap it in a list")
    if not documents:
        raise RankwiseError("no documents to encode")
    digest = _tokenizer_digest(tokenizer)
    embedded = _embedded_part(documents) if digest is not None else None
    if embedded is None:
        return torch.from_numpy(_encode(documents, tokenizer).astype(np.int64))
    path = cache_dir() / f"tokens-{digest}-{corpus_fingerprint()}" / f"{embedded[0]}-{embedded[1]}.npy"
    if path.is_file():
        array = np.load(path, allow_pickle=False)
    else:
        array = _encode(documents, tokenizer)
        save_array_atomic(path, array)
    return torch.from_numpy(array.astype(np.int64))


def _check_stream(tokens: torch.Tensor, seq_len: int, batch_size: int) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise RankwiseError("tokens must be a 1-D tensor of token ids (see encode_documents)")
    if batch_size < 1 or seq_len < 2:
        raise RankwiseError(f"need batch_size >= 1 and seq_len >= 2, got batch_size={batch_size}, seq_len={seq_len}")
    if tokens.numel() < seq_len:
        raise RankwiseError(
            f"the token stream has {tokens.numel()} tokens, fewer than seq_len={seq_len}; "
            "give more text or a shorter seq_len"
        )


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    input_ids = tokens[starts[:, None] + torch.arange(seq_len)]
    return {"input_ids": input_ids, "labels": input_ids.clone()}


class TokenBatches(Iterator[dict]):
    """Endless random windows ``{"input_ids": (B, T) long, "labels": same}`` from a token stream.

    Window starts are drawn uniformly from ``0 .. N - T`` by a private ``torch.Generator``
    seeded with ``seed``, so the sequence of batches is a function of ``seed`` alone and does
    not touch (or depend on) the global RNG. ``state_dict()`` captures the generator, so a
    resumed run sees exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, tokens: torch.Tensor, *, batch_size: int, seq_len: int, seed: int = 0) -> None:
        _check_stream(tokens, seq_len, batch_size)
        self.tokens = tokens.long()
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.batches_drawn = 0
        self._generator = torch.Generator().manual_seed(seed)

    def __next__(self) -> dict[str, torch.Tensor]:
        high = self.tokens.numel() - self.seq_len + 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self._generator)
        self.batches_drawn += 1
        return _windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        """Plain values and one uint8 tensor: loadable with ``torch.load(weights_only=True)``."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "batches_drawn": self.batches_drawn,
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; the batch shape must match this iterator's."""
        shape = (state.get("batch_size"), state.get("seq_len"))
        if shape != (self.batch_size, self.seq_len):
            raise RankwiseError(
                f"batch state is for batch_size={shape[0]}, seq_len={shape[1]} but this iterator has "
                f"batch_size={self.batch_size}, seq_len={self.seq_len}; build it with the saved shape"
            )
        generator_state = state["generator_state"]
        self._generator.set_state(generator_state)
        self.seed = state["seed"]
        self.batches_drawn = state["batches_drawn"]


def eval_batches(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Fixed evaluation batches: non-overlapping windows ``tokens[kT : (k+1)T]``.

    With ``max_batches`` set and more windows available than ``max_batches * batch_size``, the
    windows used are spread evenly over the stream (so they cover many documents, not just the
    first ones). The last batch may hold fewer rows.
    """
    _check_stream(tokens, seq_len, batch_size)
    if max_batches is not None and max_batches < 1:
        raise RankwiseError(f"max_batches must be >= 1 (or None for all), got {max_batches}")
    available = tokens.numel() // seq_len
    wanted = available if max_batches is None else min(available, max_batches * batch_size)
    # Evenly spaced window indices; distinct because wanted <= available.
    window_ids = (torch.arange(wanted, dtype=torch.float64) * (available / wanted)).long()
    starts = window_ids * seq_len
    tokens = tokens.long()
    return [_windows(tokens, starts[i : i + batch_size], seq_len) for i in range(0, wanted, batch_size)]


MASK_PROBABILITY = 0.15


@dataclass(frozen=True)
class Masking:
    """BERT's masking of a tokenizer's batches (module docstring); ``special_ids`` are never chosen."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    probability: float = MASK_PROBABILITY

    @classmethod
    def for_tokenizer(cls, tokenizer) -> Masking:
        if tokenizer.mask_token_id is None:
            raise RankwiseError(
                "the tokenizer has no mask token, which masked-LM training needs; save the model's own tokenizer "
                "(with its [MASK] token) in the model directory"
            )
        return cls(tokenizer.mask_token_id, len(tokenizer), tuple(sorted(set(tokenizer.all_special_ids))))

    def apply(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``batch`` with chosen positions replaced (80 / 10 / 10) and ``labels`` = the original
        tokens there, -100 elsewhere; at least one position per batch is chosen."""
        original = batch["input_ids"]
        allowed = ~torch.isin(original, torch.tensor(self.special_ids, dtype=original.dtype))
        if not allowed.any():
            raise RankwiseError(
                "every token of a batch is a special token (unknown tokens count as special), so nothing can be "
                "masked: the tokenizer does not cover this text -- use the model's own tokenizer"
            )
        draw = torch.rand(original.shape, generator=generator)
        chosen = (draw < self.probability) & allowed
        if not chosen.any() and allowed.any():
            candidates = allowed.flatten().nonzero().flatten()
            pick = candidates[torch.randint(0, candidates.numel(), (1,), generator=generator)]
            chosen.view(-1)[pick] = True
        kind = torch.rand(original.shape, generator=generator)
        random_tokens = torch.randint(0, self.vocab_size, original.shape, generator=generator)
        input_ids = torch.where(chosen & (kind < 0.8), torch.full_like(original, self.mask_token_id), original)
        input_ids = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_tokens, input_ids)
        labels = torch.where(chosen, original, torch.full_like(original, -100))
        return {"input_ids": input_ids, "labels": labels}


class MaskedBatches(TokenBatches):
    """:class:`TokenBatches` windows with :class:`Masking` applied by a second private generator
    (seeded from ``seed``), saved and restored by ``state_dict`` like the window draws."""

    def __init__(self, tokens: torch.Tensor, *, batch_size: int, seq_len: int, masking: Masking, seed: int = 0) -> None:
        super().__init__(tokens, batch_size=batch_size, seq_len=seq_len, seed=seed)
        self.masking = masking
        self._mask_generator = torch.Generator().manual_seed(seed + 1)

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.masking.apply(super().__next__(), self._mask_generator)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mask_generator_state": self._mask_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if "mask_generator_state" not in state:
            raise RankwiseError("this batch state was saved without masking; resume with the objective of the saved run")
        super().load_state_dict(state)
        self._mask_generator.set_state(state["mask_generator_state"])


def masked_eval_batches(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, masking: Masking, max_batches: int | None = None,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """:func:`eval_batches` with :class:`Masking` drawn once from ``seed``: the same masks every evaluation."""
    generator = torch.Generator().manual_seed(seed)
    windows = eval_batches(tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
    return [masking.apply(batch, generator) for batch in windows]


def _make_data(
    train_tokens: torch.Tensor, val_tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, max_eval: int
) -> tuple[TokenBatches, list[dict[str, torch.Tensor]]]:
    batches = TokenBatches(train_tokens, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return batches, eval_batches(val_tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_eval)


def embedded_data(
    split: str = "pretrain",
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    eval_batches: int = 8,
    tokenizer=None,
) -> tuple[TokenBatches, list[dict[str, torch.Tensor]]]:
    """Training batches and fixed validation batches of the embedded ``split``.

    ``tokenizer`` defaults to the embedded one (:func:`rankwise.data.tokenizer.get_tokenizer`).
    """
    if tokenizer is None:
        from rankwise.data.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    train_tokens = encode_documents(load_corpus(split, "train"), tokenizer)
    val_tokens = encode_documents(load_corpus(split, "validation"), tokenizer)
    return _make_data(train_tokens, val_tokens, batch_size, seq_len, seed, eval_batches)


def document_data(
    documents: Sequence[str],
    tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    eval_batches: int = 8,
    validation_fraction: float = 0.05,
) -> tuple[TokenBatches, list[dict[str, torch.Tensor]]]:
    """Like :func:`embedded_data` for the user's documents, split by :func:`split_documents`."""
    train_docs, val_docs = split_documents(documents, validation_fraction)
    train_tokens = encode_documents(train_docs, tokenizer)
    val_tokens = encode_documents(val_docs, tokenizer)
    return _make_data(train_tokens, val_tokens, batch_size, seq_len, seed, eval_batches)

