"""What a training command writes to ``--out``, so that every output directory is a valid
``--model`` for the next command (:func:`rankwise.data.models.load_model_dir` reads them all):

- a trained model (``pretrain``, full ``finetune``): ``save_pretrained`` (or
  ``save_compressed`` when it holds factorised or compressed layers) plus the tokenizer;
- an adapter (``finetune --method``): ``save_adapter`` of the adapter root plus the tokenizer;
- beside both, ``rankwise_run.json``: the base the run started from (how to load it again),
  the objective, the adapter root and the set-up.

A run without ``--out`` writes to ``rankwise-runs/<command>-<set-up>-<time>`` and says so.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from rankwise.bench.runner import Workload
from rankwise.bench.setup import SetUp
from rankwise.cli.common import check_out_path
from rankwise.data.models import RUN_FILE, RUN_FORMAT

#: where runs without --out are written (relative to the working directory)
DEFAULT_ROOT = Path("rankwise-runs")


def output_dir(out: str | None, command: str, name: str) -> Path:
    """``--out``, or a fresh directory under :data:`DEFAULT_ROOT`; checked before training."""
    if out:
        path = Path(out)
    else:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
        path = DEFAULT_ROOT / f"{command}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_out_path(path)
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rankwise")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


#: the row fields kept in rankwise_run.json's "result"
RESULT_FIELDS = ("objective", "initial_val_loss", "early_val_loss", "early_step", "final_val_loss", "final_val_ppl",
                 "peak_memory_mb", "ms_per_step", "trainable_params", "precision", "gradient_checkpointing",
                 "resumed_from_step", "history")


def _write_run_info(directory: Path, workload: Workload, setup: SetUp, command: str, output: str,
                    row: dict[str, Any] | None) -> None:
    info: dict[str, Any] = {
        "format": RUN_FORMAT,
        "version": 1,
        "rankwise": _version(),
        "command": command,
        "output": output,
        "base": workload.base,
        "objective": workload.objective_name,
        "adapter_root": workload.adapter_root,
        "data": workload.name,
        "setup": asdict(setup),
        "result": None if row is None else {key: row.get(key) for key in RESULT_FIELDS},
    }
    (directory / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def write_model(model: nn.Module, directory: Path, workload: Workload, setup: SetUp, command: str,
                row: dict[str, Any] | None = None) -> str:
    """Write the trained model, its tokenizer and the run record (with ``row``'s result, the
    training history among it); return what was written."""
    from rankwise.compress import save_compressed
    from rankwise.compress.io import compressed_modules

    directory.mkdir(parents=True, exist_ok=True)
    if compressed_modules(model) or getattr(model, "rankwise_compression", None):
        save_compressed(model, directory)
        output = "factorized"
    else:
        model.save_pretrained(directory, safe_serialization=True)
        output = "model"
    workload.tokenizer.save_pretrained(directory)
    _write_run_info(directory, workload, setup, command, output, row)
    return output


def write_adapter(model: nn.Module, directory: Path, workload: Workload, setup: SetUp, command: str,
                  row: dict[str, Any] | None = None) -> str:
    """Write the adapter (module names relative to the adapter root), the tokenizer and the run record."""
    from rankwise.adapters import save_adapter

    root = model.get_submodule(workload.adapter_root) if workload.adapter_root else model
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(root, directory)
    workload.tokenizer.save_pretrained(directory)
    _write_run_info(directory, workload, setup, command, "adapter", row)
    return "adapter"
