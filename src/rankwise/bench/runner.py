"""Run set-ups side by side on one workload and collect comparable rows.

Every set-up of a run starts from the same model (a fresh random init with the same seed
for pretraining, the same base checkpoint for fine-tuning), sees the same batches in the
same order, and is measured the same way (see :func:`rankwise.training.train`). What a set-up
does to the model, and which optimizer and training-time hooks it brings, is
:mod:`rankwise.bench.kinds`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from rankwise.bench.kinds import prepare
from rankwise.bench.setup import SetUp
from rankwise.data.batches import TokenBatches
from rankwise.training import cosine_schedule, train

MB = 1024 * 1024


@dataclass(frozen=True)
class RunConfig:
    """How long and on what shape of batches each set-up trains."""

    steps: int = 150
    batch_size: int = 8
    seq_len: int = 128
    eval_every: int = 25
    eval_batches: int = 8
    warmup_steps: int = 10
    early_step: int = 25
    seed: int = 0


@dataclass
class Workload:
    """A model factory and the data every set-up of a suite trains and evaluates on."""

    name: str
    make_model: Callable[[], nn.Module]
    train_tokens: torch.Tensor
    eval_data: list[dict]
    hidden_size: int

    def batches(self, config: RunConfig) -> TokenBatches:
        return TokenBatches(self.train_tokens, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)


def bench_device() -> torch.device:
    """Where set-ups train: the first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _early_val_loss(history: list[dict[str, Any]], step: int) -> float | None:
    for record in history:
        if record["step"] >= step and "val_loss" in record:
            return record["val_loss"]
    return None


def run_setup(
    setup: SetUp,
    workload: Workload,
    config: RunConfig,
    *,
    progress: Any = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Train one set-up; return its result row and the trained model.

    A ``reference`` set-up whose package is not installed is not trained: its row carries a
    ``note`` saying why, and the model returned is None.
    """
    from rankwise.bench.references import reference_state_bytes, unavailable_reason
    from rankwise.optim import state_bytes

    skipped = unavailable_reason(setup.method) if setup.kind == "reference" else None
    if skipped:
        if progress is not None and hasattr(progress, "update"):
            progress.update(config.steps)
        return {"setup": setup.name, "kind": setup.kind, "method": setup.method, "note": f"skipped: {skipped}",
                "history": [], "setup_spec": asdict(setup)}, None
    torch.manual_seed(config.seed)
    model = workload.make_model().to(bench_device())
    batches = workload.batches(config)
    started = time.perf_counter()
    prepared = prepare(setup, model, workload.hidden_size, copy.deepcopy(batches), config.steps)
    optimizer = prepared.optimizer
    init_seconds = time.perf_counter() - started
    scheduler = (prepared.schedule or cosine_schedule)(optimizer, warmup_steps=config.warmup_steps,
                                                       total_steps=config.steps)
    result = train(
        model,
        optimizer,
        batches,
        steps=config.steps,
        eval_batches=workload.eval_data,
        eval_every=config.eval_every,
        scheduler=scheduler,
        progress=progress,
        hooks=prepared.hooks,
    )
    row = {
        "setup": setup.name,
        "kind": setup.kind,
        "method": setup.method,
        "rank": setup.resolved_rank(workload.hidden_size),
        "lr": setup.lr,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "init_seconds": init_seconds,
        "optimizer_state_mb": (reference_state_bytes if setup.kind == "reference" else state_bytes)(optimizer) / MB,
        # time spent in subspace refreshes (SVDs, ...), already inside ms_per_step; None when not measured
        "refresh_ms_per_step": (1000.0 * optimizer.refresh_seconds / config.steps
                                if hasattr(optimizer, "refresh_seconds") else None),
        "peak_memory_mb": result.peak_memory_mb,
        "ms_per_step": result.ms_per_step,
        f"val_loss_at_{config.early_step}": _early_val_loss(result.history, config.early_step),
        "final_val_loss": result.final_val_loss,
        "final_val_ppl": result.final_val_ppl,
        "history": result.history,
        "setup_spec": asdict(setup),
    }
    return row, model
