"""Data and models that ship with rankwise, and the user's own.

- :mod:`~rankwise.data.corpus`     embedded corpus (stdlib sources / pydoc topics), user .txt/.jsonl
- :mod:`~rankwise.data.tokenizer`  byte-level BPE (4096) trained on first use, cached
- :mod:`~rankwise.data.batches`    token streams, random training windows, fixed eval windows
- :mod:`~rankwise.data.models`     LLaMA presets, the cached pretrained base, user HF models
"""

from rankwise.data.batches import TokenBatches, document_data, embedded_data, encode_documents, eval_batches
from rankwise.data.corpus import corpus_fingerprint, load_corpus, load_text_files, split_documents
from rankwise.data.models import (
    PRESETS,
    build_model,
    count_parameters,
    load_base,
    load_user_model,
)
from rankwise.data.tokenizer import get_tokenizer

__all__ = [
    "PRESETS",
    "TokenBatches",
    "build_model",
    "corpus_fingerprint",
    "count_parameters",
    "document_data",
    "embedded_data",
    "encode_documents",
    "eval_batches",
    "get_tokenizer",
    "load_base",
    "load_corpus",
    "load_text_files",
    "load_user_model",
    "split_documents",
]
