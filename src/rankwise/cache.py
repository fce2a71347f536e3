"""Where rankwise keeps what it builds on first use (tokenizer, corpus tokens, base checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$RANKWISE_CACHE`` if set, else ``~/.cache/rankwise``; created on demand."""
    root = Path(os.environ.get("RANKWISE_CACHE") or Path.home() / ".cache" / "rankwise")
    root.mkdir(parents=True, exist_ok=True)
    return root
