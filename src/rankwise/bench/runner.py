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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from rankwise.bench.kinds import prepare
from rankwise.bench.setup import SetUp
from rankwise.data.batches import Masking, MaskedBatches, TokenBatches
from rankwise.errors import RankwiseError
from rankwise.training import (
    CAUSAL_LM,
    Objective,
    cosine_schedule,
    load_training_state,
    read_training_state,
    save_training_state,
    TrainingHooks,
    train,
)

MB = 1024 * 1024
#: ``--dtype`` names -> the dtype the model's weights are cast to before a set-up is applied
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
#: ``--gradient-checkpointing`` modes -> use_reentrant
CHECKPOINTING = {"non-reentrant": False, "reentrant": True}


@dataclass(frozen=True)
class RunConfig:
    """How long, on what shape of batches and how (device, precision, checkpointing) each set-up trains.

    ``dtype``: the weights' dtype (:data:`DTYPES`); ``bf16``: bf16 autocast of forward and
    loss with the weights kept in ``dtype`` (mixed precision with fp32 master weights);
    ``gradient_checkpointing``: None, ``"non-reentrant"`` or ``"reentrant"``; ``device``: None
    picks :func:`bench_device`.
    """

    steps: int = 150
    batch_size: int = 8
    seq_len: int = 128
    eval_every: int = 25
    eval_batches: int = 8
    warmup_steps: int = 10
    early_step: int = 25
    seed: int = 0
    dtype: str = "fp32"
    bf16: bool = False
    gradient_checkpointing: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise RankwiseError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.gradient_checkpointing is not None and self.gradient_checkpointing not in CHECKPOINTING:
            raise RankwiseError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)} or None, "
                                f"got {self.gradient_checkpointing!r}")


@dataclass
class Workload:
    """A model factory and the data every set-up of a suite trains and evaluates on.

    ``objective`` is what the set-ups train on (next-token prediction unless the model is an
    encoder); ``masking`` makes the training batches masked ones (masked-LM and hidden-state
    objectives); ``adapter_root`` is the submodule adapters go on; ``base`` how to find the
    starting model again (recorded beside a run's output); ``data_how`` how the data was split.
    """

    name: str
    make_model: Callable[[], nn.Module]
    train_tokens: torch.Tensor
    eval_data: list[dict]
    hidden_size: int
    tokenizer: Any = None
    objective: Objective = CAUSAL_LM
    masking: Masking | None = None
    adapter_root: str = ""
    base: dict[str, Any] | None = None
    data_how: str = ""
    objective_name: str = "causal-lm"

    def batches(self, config: RunConfig) -> TokenBatches:
        if self.masking is not None:
            return MaskedBatches(self.train_tokens, batch_size=config.batch_size, seq_len=config.seq_len,
                                 masking=self.masking, seed=config.seed)
        return TokenBatches(self.train_tokens, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)


def bench_device() -> torch.device:
    """Where set-ups train: the first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_device(config: RunConfig) -> torch.device:
    """The device of ``config`` (:func:`bench_device` when it names none); RankwiseError if unusable."""
    if config.device is None:
        return bench_device()
    try:
        device = torch.device(config.device)
    except (RuntimeError, ValueError):
        raise RankwiseError(f"unknown device {config.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RankwiseError(f"device {config.device!r} asked for but torch sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise RankwiseError(f"device {config.device!r}: rankwise runs on cpu and cuda")
    return device


def _early_val_loss(history: list[dict[str, Any]], step: int) -> float | None:
    for record in history:
        if record["step"] >= step and "val_loss" in record:
            return record["val_loss"]
    return None


@dataclass
class Checkpointing:
    """Save the run every ``every`` steps to ``directory / f"checkpoint-{step}"``: its training
    state (:func:`rankwise.training.save_training_state`) and, through ``write_output(model, dir)``,
    the run's output as it is then (so a checkpoint is a model directory too)."""

    every: int
    directory: Path
    write_output: Callable[[nn.Module, Path], None] | None = None
    written: list[Path] = field(default_factory=list)


def _run_identity(setup: SetUp, workload: Workload, config: RunConfig) -> dict[str, Any]:
    """What a resumed run must share with the saved one (device and progress may differ)."""
    run = {k: v for k, v in asdict(config).items() if k != "device"}
    return {"setup": asdict(setup), "run_config": run, "workload": workload.name}


def _check_same_run(saved: dict[str, Any], identity: dict[str, Any], where: Path) -> None:
    differing = []
    for section in ("setup", "run_config"):
        for key, value in identity[section].items():
            old = saved.get(section, {}).get(key)
            if old != value and not (isinstance(value, (tuple, list)) and list(value) == old):
                differing.append(f"{key}: saved {old!r}, now {value!r}")
    if saved.get("workload") != identity["workload"]:
        differing.append(f"data: saved {saved.get('workload')!r}, now {identity['workload']!r}")
    if differing:
        raise RankwiseError(
            f"{where} was saved by another run ({'; '.join(differing[:4])}); resume with the saved run's "
            "method, options, data and step count"
        )


def run_setup(
    setup: SetUp,
    workload: Workload,
    config: RunConfig,
    *,
    progress: Any = None,
    hooks: Sequence[TrainingHooks] = (),
    checkpointing: Checkpointing | None = None,
    resume_from: str | Path | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """Train one set-up; return its result row and the trained model. ``hooks`` run in the training
    loop after the set-up's own (observers such as a gradient-rank recorder).

    A ``reference`` set-up whose package is not installed is not trained: its row carries a
    ``note`` saying why, and the model returned is None. ``checkpointing`` saves the run as it
    goes; ``resume_from`` (a checkpoint of the same run) continues it after the saved step,
    with exactly the result the uninterrupted run gives.
    """
    from rankwise.bench.references import reference_state_bytes, unavailable_reason
    from rankwise.optim import state_bytes

    skipped = unavailable_reason(setup.method) if setup.kind == "reference" else None
    if skipped:
        if progress is not None and hasattr(progress, "update"):
            progress.update(config.steps)
        return {"setup": setup.name, "kind": setup.kind, "method": setup.method, "note": f"skipped: {skipped}",
                "history": [], "setup_spec": asdict(setup)}, None
    identity = _run_identity(setup, workload, config)
    saved = read_training_state(resume_from) if resume_from is not None else None
    if saved is not None:
        _check_same_run(saved["info"], identity, Path(resume_from))
    device = run_device(config)
    torch.manual_seed(config.seed)
    model = workload.make_model().to(device=device, dtype=DTYPES[config.dtype])
    batches = workload.batches(config)
    started = time.perf_counter()
    loss_fn = workload.objective.loss if workload.objective is not CAUSAL_LM else None
    prepared = prepare(setup, model, workload.hidden_size, copy.deepcopy(batches), config.steps,
                       adapter_root=workload.adapter_root, loss_fn=loss_fn)
    optimizer = prepared.optimizer
    init_seconds = time.perf_counter() - started
    scheduler = (prepared.schedule or cosine_schedule)(optimizer, warmup_steps=config.warmup_steps,
                                                       total_steps=config.steps)
    start_step, earlier, initial = 0, [], None
    if saved is not None:
        state = load_training_state(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, batches=batches,
                                    hooks=prepared.hooks)
        start_step, earlier, initial = state["step"], state["history"], state["info"].get("initial_val_loss")
        if start_step >= config.steps:
            raise RankwiseError(f"{resume_from} is at step {start_step}, the end of a {config.steps}-step run: "
                                "nothing to resume (give more --steps to train further as a new run)")
    save = None
    if checkpointing is not None:
        def save(step: int, so_far) -> None:
            target = checkpointing.directory / f"checkpoint-{step}"
            info = {**identity, "initial_val_loss": initial if initial is not None else so_far.initial_val_loss}
            save_training_state(target, model=model, optimizer=optimizer, step=step, scheduler=scheduler,
                                batches=batches, history=earlier + so_far.history, info=info, hooks=prepared.hooks)
            if checkpointing.write_output is not None:
                checkpointing.write_output(model, target)
            checkpointing.written.append(target)

    result = train(
        model,
        optimizer,
        batches,
        steps=config.steps,
        eval_batches=workload.eval_data,
        eval_every=config.eval_every,
        scheduler=scheduler,
        progress=progress,
        hooks=(*prepared.hooks, *hooks),
        objective=workload.objective,
        gradient_checkpointing=config.gradient_checkpointing is not None,
        use_reentrant=CHECKPOINTING.get(config.gradient_checkpointing, False),
        autocast_dtype=torch.bfloat16 if config.bf16 else None,
        start_step=start_step,
        save_every=checkpointing.every if checkpointing else None,
        save=save,
    )
    history = earlier + result.history
    forward_ms = _forward_ms(model, workload, config, device)
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
        "forward_ms": forward_ms,
        "initial_val_loss": result.initial_val_loss if initial is None else initial,
        "early_val_loss": _early_val_loss(history, config.early_step),
        "early_step": config.early_step,
        "final_val_loss": result.final_val_loss,
        "final_val_ppl": result.final_val_ppl,
        "objective": workload.objective.name,
        "precision": f"{config.dtype} weights" + (", bf16 autocast" if config.bf16 else ""),
        "gradient_checkpointing": config.gradient_checkpointing,
        "resumed_from_step": start_step or None,
        "history": history,
        "setup_spec": asdict(setup),
    }
    return row, model


#: timed evaluation forwards per set-up (after one warm-up); their median is ``forward_ms``
FORWARD_REPEATS = 5


def _forward_ms(model: nn.Module, workload: Workload, config: RunConfig, device: torch.device) -> float | None:
    """Median wall time (ms) of the trained model's evaluation forward and loss on the first
    validation batch, in eval mode without gradients (under bf16 autocast when the run used it):
    the inference cost of the set-up's structure (an unmerged adapter, factorised layers ...)."""
    if not workload.eval_data:
        return None
    batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in workload.eval_data[0].items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad(), autocast:
            for repeat in range(FORWARD_REPEATS + 1):
                started = time.perf_counter()
                workload.objective.loss(model, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if repeat:  # the first is a warm-up
                    times.append(time.perf_counter() - started)
    finally:
        model.train(was_training)
    return 1000.0 * sorted(times)[len(times) // 2]
