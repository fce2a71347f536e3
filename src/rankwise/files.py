"""Reading the JSON files rankwise writes beside its safetensors (adapters, PEFT adapters,
compressed models), with errors that say what to do. JSON only: nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rankwise.errors import RankwiseError


def read_json_object(directory: Path, filename: str, *, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``directory / filename``.

    ``what`` names the directory for the messages ("adapter directory"); ``fix`` says how to
    get a good one ("pass a directory written by save_adapter"). Raises RankwiseError when the
    directory or file is missing, the file is not JSON, or it holds something else than an object.
    """
    if not directory.is_dir():
        raise RankwiseError(f"{what} {directory} does not exist; {fix}")
    path = directory / filename
    if not path.is_file():
        raise RankwiseError(f"{path} is missing; {directory} is not a {what}: {fix}")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RankwiseError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(value, dict):
        raise RankwiseError(f"{path} must hold a JSON object; {fix}")
    return value
