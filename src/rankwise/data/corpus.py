"""The embedded corpus: text that ships with every CPython install, nothing downloaded.

Two splits with different domains, so fine-tuning has a real distribution shift to cover:

* ``pretrain`` -- the standard library's own ``.py`` sources (``sysconfig.get_paths()["stdlib"]``),
  without test suites, IDLE, third-party ``site-packages``, byte-code caches and generated
  files (codec tables, keyword/token tables, ``_sysconfigdata*``, anything over 200 kB).
* ``finetune`` -- the English documentation prose of ``pydoc_data.topics.topics`` (the text
  ``help("if")`` prints). ``pydoc_data`` is kept out of ``pretrain`` so the two never overlap.

Each split is divided into ``train`` and ``validation`` parts by a stable hash of the document's
name (its path relative to the stdlib, or its topic key): a document is in validation iff
``sha256(name)`` read as a fraction of ``2**64`` is below the split's fraction in
:data:`VALIDATION_FRACTIONS` (5% of the stdlib; 10% of the 79 much smaller topics, so their
validation part still holds ~27k characters). The assignment does not depend on the order
files are listed in or on the Python process.

User data enters through :func:`load_text_files` (``.txt``: one document per file; ``.jsonl``:
one document per line) and :func:`split_documents` (the same hash rule, on the text itself);
:func:`split_for_training` also takes a single document (one ``.txt`` file): by paragraphs
when it has enough of them, else by size, and says how it split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rankwise.errors import RankwiseError

SPLITS = ("pretrain", "finetune")
PARTS = ("train", "validation")
VALIDATION_FRACTION = 0.05
VALIDATION_FRACTIONS = {"pretrain": VALIDATION_FRACTION, "finetune": 0.10}

# Directory names anywhere in a stdlib path that mark text we do not want to train on.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__", "pydoc_data"})
# Generated sources announce themselves in their first lines; tables of hex and escapes are
# not code anyone writes, and would spend the tokenizer's vocabulary on noise.
_GENERATED_MARKER = re.compile(
    r"auto-?generated|automatically generated|generated (?:from|by) \S+\.py|gencodec\.py|do not edit",
    re.IGNORECASE,
)
_GENERATED_HEADER_CHARS = 600
_MAX_SOURCE_BYTES = 200_000


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def _pretrain_files() -> tuple[tuple[str, Path], ...]:
    """``(name, path)`` of every stdlib source in the pretrain split, sorted by name."""
    root = _stdlib_root()
    files = []
    for directory, subdirectories, filenames in os.walk(root):
        # Prune in place: never descend into test suites or site-packages (thousands of files).
        subdirectories[:] = [name for name in subdirectories if name not in _EXCLUDED_DIRS]
        for filename in filenames:
            path = Path(directory, filename)
            if (
                filename.endswith(".py")
                and not filename.startswith("_sysconfigdata")
                and path.stat().st_size <= _MAX_SOURCE_BYTES
            ):
                files.append((path.relative_to(root).as_posix(), path))
    return tuple(sorted(files))


def _read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def _named_documents_pretrain() -> tuple[tuple[str, str], ...]:
    documents = []
    for name, path in _pretrain_files():
        text = _read_source(path)
        if text.strip() and not _GENERATED_MARKER.search(text[:_GENERATED_HEADER_CHARS]):
            documents.append((name, text))
    return tuple(documents)


@functools.lru_cache(maxsize=1)
def _named_documents_finetune() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    return tuple((key, topics[key]) for key in sorted(topics) if topics[key].strip())


def _named_documents(split: str) -> tuple[tuple[str, str], ...]:
    if split not in SPLITS:
        raise RankwiseError(f"unknown corpus split {split!r}; use one of {', '.join(SPLITS)}")
    return _named_documents_pretrain() if split == "pretrain" else _named_documents_finetune()


def _hash_fraction(key: str) -> float:
    """A stable number in [0, 1) derived from ``key`` (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_part(part: str) -> None:
    if part not in PARTS:
        raise RankwiseError(f"unknown corpus part {part!r}; use one of {', '.join(PARTS)}")


def load_corpus(split: str = "pretrain", part: str = "train") -> list[str]:
    """Documents of the embedded ``split`` ("pretrain" | "finetune"), ``part`` ("train" | "validation")."""
    _check_part(part)
    documents = _named_documents(split)
    fraction = VALIDATION_FRACTIONS[split]
    want_validation = part == "validation"
    return [text for name, text in documents if (_hash_fraction(name) < fraction) == want_validation]


@functools.lru_cache(maxsize=1)
def corpus_fingerprint() -> str:
    """Short hash of the Python version, the embedded files (names and sizes) and the selection
    and split rules, for cache keys.

    Two interpreters that ship the same standard library get the same fingerprint, so caches
    built from the corpus are shared exactly when the corpus is the same.
    """
    import pydoc_data.topics

    hasher = hashlib.sha256(sys.version.split()[0].encode())
    # The selection and split rules are part of the corpus too: changing them renews every cache.
    rules = (sorted(_EXCLUDED_DIRS), _GENERATED_MARKER.pattern, _MAX_SOURCE_BYTES, sorted(VALIDATION_FRACTIONS.items()))
    hasher.update(repr(rules).encode())
    for name, path in _pretrain_files():
        hasher.update(f"{name}:{path.stat().st_size};".encode())
    hasher.update(f"pydoc_data:{Path(pydoc_data.topics.__file__).stat().st_size}".encode())
    return hasher.hexdigest()[:12]


def _document_from_record(record: object, where: str) -> str:
    if not isinstance(record, dict):
        raise RankwiseError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str):
            raise RankwiseError(f'{where}: field "text" must be a string, got {type(text).__name__}')
        return text
    string_fields = [key for key, value in record.items() if isinstance(value, str)]
    if len(string_fields) != 1:
        found = ", ".join(string_fields) or "none"
        raise RankwiseError(
            f'{where}: no "text" field and not exactly one string field (string fields: {found}); '
            'put each document under the key "text"'
        )
    return record[string_fields[0]]


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RankwiseError(f"{where}: not valid JSON ({error.msg}); write one JSON object per line") from None
            documents.append(_document_from_record(record, where))
    return documents


def _read_txt(path: Path) -> list[str]:
    return [path.read_text(encoding="utf-8")]


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl}


def _read(path: Path) -> list[str]:
    try:
        return _READERS[path.suffix](path)
    except UnicodeDecodeError as error:
        raise RankwiseError(f"{path} is not UTF-8 text ({error.reason}); convert it to UTF-8") from None


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _READERS)
        if not found:
            raise RankwiseError(f"directory {path} holds no .txt or .jsonl files")
        return found
    if not path.is_file():
        raise RankwiseError(f"data file {path} does not exist; pass .txt or .jsonl files or a directory of them")
    if path.suffix not in _READERS:
        raise RankwiseError(f"unsupported data file {path}: use .txt (one document per file) or .jsonl (field \"text\")")
    return [path]


def load_text_files(paths: Sequence[str | Path]) -> list[str]:
    """Documents from the user's files: ``.txt`` = one document per file, ``.jsonl`` = one per line.

    A JSONL line is an object whose ``"text"`` field (or, failing that, its only string field)
    is the document. Directories are searched recursively for both kinds. Blank documents are
    dropped. Every file is checked before any is read, so a typo fails fast.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = [file for path in paths for file in _expand(Path(path))]
    if not files:
        raise RankwiseError("no data files given; pass .txt or .jsonl files")
    documents = [doc for file in files for doc in _read(file) if doc.strip()]
    if not documents:
        raise RankwiseError(f"the data files ({', '.join(map(str, files))}) contain no non-empty documents")
    return documents


def split_documents(
    documents: Sequence[str], validation_fraction: float = VALIDATION_FRACTION
) -> tuple[list[str], list[str]]:
    """Deterministic ``(train, validation)`` split of user documents by a stable hash of their text.

    A document goes to validation iff ``sha256(text)`` as a fraction of ``2**64`` is below
    ``validation_fraction``, so the split does not depend on file order. With two or more
    documents both parts are non-empty: if the hash rule leaves one empty, the document with the
    smallest (resp. largest) hash is moved across.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise RankwiseError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if len(documents) < 2:
        raise RankwiseError(
            f"need at least 2 documents to split off a validation part, got {len(documents)}; "
            "split_for_training also splits a single document (by paragraphs or by size)"
        )
    scores = [_hash_fraction(doc) for doc in documents]
    in_validation = [score < validation_fraction for score in scores]
    if not any(in_validation):
        in_validation[min(range(len(scores)), key=scores.__getitem__)] = True
    if all(in_validation):
        in_validation[max(range(len(scores)), key=scores.__getitem__)] = False
    train = [doc for doc, val in zip(documents, in_validation) if not val]
    validation = [doc for doc, val in zip(documents, in_validation) if val]
    return train, validation


#: a single document is split by paragraphs when it has at least this many (else by size)
MIN_PARAGRAPHS = 20
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class TrainingSplit:
    """Training and validation documents and a sentence saying how they were split."""

    train: list[str]
    validation: list[str]
    how: str


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _split_by_size(text: str, validation_fraction: float) -> tuple[str, str]:
    """``(head, tail)`` with the tail about ``validation_fraction`` of the characters, cut at the
    last line break (else whitespace) before that point so no line is cut in two."""
    cut = int(len(text) * (1.0 - validation_fraction))
    for boundary in ("\n", " "):
        at = text.rfind(boundary, 0, cut)
        if at > 0:
            return text[: at + 1], text[at + 1 :]
    return text[:cut], text[cut:]


def split_for_training(
    documents: Sequence[str], validation_fraction: float = VALIDATION_FRACTION
) -> TrainingSplit:
    """Training / validation parts of the user's documents, and how they were made.

    Two or more documents: :func:`split_documents` (by a hash of each document's text). A single
    document (one ``.txt`` file): its paragraphs (blocks separated by blank lines) are split the
    same way when there are at least :data:`MIN_PARAGRAPHS` of them; otherwise the last
    ``validation_fraction`` of its characters (cut at a line break) is held out.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise RankwiseError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise RankwiseError("no non-empty documents to train on")
    percent = f"{100 * validation_fraction:g}%"
    if len(documents) >= 2:
        train, validation = split_documents(documents, validation_fraction)
        return TrainingSplit(train, validation, (
            f"{_plural(len(documents), 'document')}: {len(train)} for training, {len(validation)} held out for "
            f"validation (about {percent}, chosen by a hash of each document's text)"))
    text = documents[0]
    paragraphs = [part for part in _PARAGRAPH_BREAK.split(text) if part.strip()]
    if len(paragraphs) >= MIN_PARAGRAPHS:
        train, validation = split_documents(paragraphs, validation_fraction)
        return TrainingSplit(train, validation, (
            f"1 document split at blank lines into {len(paragraphs)} paragraphs: {len(train)} for training, "
            f"{len(validation)} held out for validation (about {percent}, chosen by a hash of each paragraph)"))
    head, tail = _split_by_size(text, validation_fraction)
    if not head.strip() or not tail.strip():
        raise RankwiseError(
            "the text is too short to hold out a validation part; give more text (several paragraphs, or "
            "several .txt / JSONL documents)"
        )
    return TrainingSplit([head], [tail], (
        f"1 document with {_plural(len(paragraphs), 'paragraph')} (fewer than {MIN_PARAGRAPHS}, so split by size): "
        f"the first {len(head):,} characters for training, the last {len(tail):,} (about {percent}, cut at a line "
        "break) held out for validation"))
