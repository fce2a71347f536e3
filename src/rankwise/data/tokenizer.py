"""The embedded tokenizer: byte-level BPE trained on the stdlib sources on first use.

Byte-level BPE (GPT-2 style): text is read as UTF-8 bytes, each byte mapped to a printable
symbol, split with the GPT-2 pre-tokenisation regex, then merged by the learned BPE rules, so
every string round-trips exactly (``decode(encode(x)) == x``) and nothing is ever unknown.
Vocabulary :data:`VOCAB_SIZE` = 4096 (256 byte symbols + 1 special + 3839 merges); the one
special token ``<|endoftext|>`` separates documents and doubles as padding.

The tokenizer is trained once on the train part of the ``pretrain`` split (the whole part takes
~3 s on 2 CPU cores; :data:`MAX_TRAINING_CHARS` limits it, e.g. in tests) and saved as JSON with
``save_pretrained`` under ``cache_dir()/tokenizer-<key>/`` where the key is
:func:`tokenizer_key`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from rankwise.cache import cache_dir
from rankwise.data._cache import atomic_directory
from rankwise.data.corpus import corpus_fingerprint, load_corpus

VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 512
# None = train on the whole pretrain train part; an int keeps the first documents (in name
# order) until that many characters are collected. Part of the cache key.
MAX_TRAINING_CHARS: int | None = None


def tokenizer_key() -> str:
    """Cache key of the tokenizer :func:`get_tokenizer` returns: corpus fingerprint (+ size limit)."""
    key = corpus_fingerprint()
    return key if MAX_TRAINING_CHARS is None else f"{key}-c{MAX_TRAINING_CHARS}"


def _training_documents() -> list[str]:
    documents = load_corpus("pretrain", "train")
    if MAX_TRAINING_CHARS is None:
        return documents
    chosen, total = [], 0
    for document in documents:
        if total >= MAX_TRAINING_CHARS:
            break
        chosen.append(document[: MAX_TRAINING_CHARS - total])
        total += len(chosen[-1])
    return chosen


def train_tokenizer(documents: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``documents`` and wrap it for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_dir() -> Path:
    """Where the embedded tokenizer is (or will be) cached."""
    return cache_dir() / f"tokenizer-{tokenizer_key()}"


def get_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded tokenizer: loaded from the cache, trained and cached on first use."""
    directory = tokenizer_dir()
    if not (directory / "tokenizer.json").is_file():
        tokenizer = train_tokenizer(_training_documents())
        with atomic_directory(directory) as staging:
            tokenizer.save_pretrained(staging)
    return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
