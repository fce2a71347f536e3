"""The one training loop of rankwise (bench, CLI and the cached base all use it).

Each step::

    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss + sum(hook.loss_term(model) for hook in hooks)
    loss.backward()
    clip_grad_norm_(max_grad_norm)       # only if max_grad_norm is given
    optimizer.step()
    hook.after_step(model, step=..., total_steps=..., optimizer=...) for hook in hooks
    scheduler.step()                     # only if given

``hooks`` are :class:`TrainingHooks`: whatever a set-up installed that acts during training
(an adapter method's regulariser or rank schedule, a parametrisation's restarts), whichever
pillar it comes from; the loop knows nothing else about them.

and it measures, the same way for every set-up:

* ``ms_per_step`` -- mean wall time of the optimisation steps (zero_grad .. scheduler.step),
  evaluation excluded and the first step excluded as warm-up (lazy state allocation,
  kernel selection) whenever more than one step ran;
* ``peak_memory_mb`` -- on CUDA ``torch.cuda.max_memory_allocated`` (reset at the start);
  elsewhere the peak reported by :class:`MemoryTracker` (definition there).

The validation loss (:func:`evaluate`) is the mean next-token cross-entropy over all predicted
tokens of the evaluation batches, and perplexity is ``exp`` of it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.errors import RankwiseError

MB = 1024 * 1024
IGNORE_INDEX = -100


@dataclass
class TrainResult:
    """What :func:`train` measured. ``history`` rows: ``step``, ``train_loss``, ``lr`` and, where
    evaluated, ``val_loss``; ``regularizer`` too (the summed hook loss terms) when a hook gave one."""

    history: list[dict] = field(default_factory=list)
    final_val_loss: float | None = None
    final_val_ppl: float | None = None
    ms_per_step: float = 0.0
    peak_memory_mb: float = 0.0
    steps: int = 0


class TrainingHooks:
    """What a set-up asks of the training loop besides forward, backward and the optimizer step.

    Both methods do nothing by default; a method overrides what it needs:

    * ``loss_term(model)``: a tensor added to the task loss before backward, or None
      (SORSA's orthonormal regulariser, AdaLoRA's orthogonality penalty);
    * ``after_step(model, *, step, total_steps, optimizer)``: runs after each optimizer step,
      ``step`` counting from 1 to ``total_steps`` (AdaLoRA / IncreLoRA budget schedules, SoRA's
      proximal update, ReLoRA-style merge-and-restart).
    """

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, *, step: int, total_steps: int, optimizer: Any) -> None:
        return None


def _loss_terms(hooks: Sequence[TrainingHooks], model: nn.Module) -> torch.Tensor | None:
    terms = [term for term in (hook.loss_term(model) for hook in hooks) if term is not None]
    return torch.stack([term.reshape(()) for term in terms]).sum() if terms else None


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(address, bytes)`` of the storage behind ``tensor``; views share their base's key."""
    try:
        storage = tensor.untyped_storage()
        address, size = storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        address, size = id(tensor), tensor.numel() * tensor.element_size()
    return (address, size) if size else None


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


class MemoryTracker:
    """Peak tensor memory of training, measured exactly on any device (used on CPU).

    Definition: the memory of a training step at a given moment is the total size of the
    distinct storages (deduplicated by address, so views and shared weights count once) of

    * the model's parameters,
    * their gradients,
    * every tensor in ``optimizer.state`` (moments, projection matrices, step counters, ...),
    * the activations saved for backward during the forward pass (recorded with
      ``torch.autograd.graph.saved_tensors_hooks``; inputs saved by ops, e.g. the token ids
      kept by the embedding, are included).

    It is sampled at the points where it peaks: after the forward pass (just before
    ``backward``, when all saved activations are alive), after ``backward`` (just before
    ``optimizer.step``, gradients alive) and after ``optimizer.step`` (which is where state is
    first allocated). ``peak_bytes`` is the maximum over all samples. Transient workspace inside
    a kernel or an optimizer's step, allocator caching, non-tensor Python objects and tensors a
    custom ``autograd.Function`` keeps as plain ``ctx`` attributes (instead of
    ``save_for_backward``) are not counted; what is counted is exact and the same on every machine.
    """

    def __init__(self, model: nn.Module, optimizer: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.peak_bytes = 0
        self._activations: dict[int, int] = {}

    def _record(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None:
            self._activations[key[0]] = max(key[1], self._activations.get(key[0], 0))
        return tensor

    @contextlib.contextmanager
    def saving_activations(self) -> Iterator[None]:
        """Record every tensor autograd saves for backward inside this block."""
        with torch.autograd.graph.saved_tensors_hooks(self._record, lambda tensor: tensor):
            yield

    def clear_activations(self) -> None:
        """Forget the recorded activations (call after ``backward`` has released them)."""
        self._activations.clear()

    def current_bytes(self) -> int:
        storages: dict[int, int] = dict(self._activations)
        tensors: list[torch.Tensor] = []
        for parameter in self.model.parameters():
            tensors.append(parameter)
            if parameter.grad is not None:
                tensors.append(parameter.grad)
        state = getattr(self.optimizer, "state", None)
        if state is not None:
            tensors.extend(_tensors_in(list(state.values())))
        for tensor in tensors:
            key = _storage_key(tensor)
            if key is not None:
                storages[key[0]] = max(key[1], storages.get(key[0], 0))
        return sum(storages.values())

    def sample(self) -> int:
        """Measure now, update the peak, return the current bytes."""
        now = self.current_bytes()
        self.peak_bytes = max(self.peak_bytes, now)
        return now

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MB


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise RankwiseError("the model has no parameters to train") from None


def _to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _predicted_tokens(batch: dict) -> int:
    """Tokens a causal LM predicts in ``batch``: labels shifted by one, ignore-index excluded."""
    labels = batch.get("labels")
    if labels is None:
        raise RankwiseError("evaluation batches need 'labels' (use rankwise.data.batches.eval_batches)")
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def evaluate(model: nn.Module, batches: Iterable[dict]) -> float:
    """Mean next-token loss over all predicted tokens of ``batches`` (no grad).

    Each batch's mean loss is weighted by its number of predicted tokens, so a short last batch
    counts for what it holds. The model is put in eval mode and its mode restored afterwards.
    """
    batches = list(batches)
    if not batches:
        raise RankwiseError("no evaluation batches given")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                tokens = _predicted_tokens(batch)
                loss = model(**_to_device(batch, device)).loss
                total += float(loss) * tokens
                count += tokens
    finally:
        model.train(was_training)
    if count == 0:
        raise RankwiseError("the evaluation batches contain no predicted tokens (all labels are -100?)")
    return total / count


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise RankwiseError(f"{name} must be a positive integer, got {value!r}")


def _report_progress(progress: Any, step: int, record: dict) -> None:
    if progress is None:
        return
    if hasattr(progress, "update"):
        if hasattr(progress, "set_postfix"):
            shown = {key: f"{value:.4f}" for key, value in record.items() if key.endswith("loss")}
            progress.set_postfix(shown, refresh=False)
        progress.update(1)
    elif callable(progress):
        progress(step, record)
    else:
        raise RankwiseError("progress must be a tqdm-like object (with .update) or a callable(step, metrics)")


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[dict],
    *,
    steps: int,
    eval_batches: list[dict] | None = None,
    eval_every: int | None = None,
    scheduler: Any = None,
    hooks: Sequence[TrainingHooks] = (),
    progress: Any = None,
    log_every: int | None = None,
    max_grad_norm: float | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimisation steps and measure loss, time and memory.

    ``batches`` yields dicts the model accepts (``input_ids``, ``labels``, ...); they are moved
    to the model's device. ``eval_batches`` are evaluated every ``eval_every`` steps and always
    after the last step (``final_val_loss``). Each of ``hooks`` adds its ``loss_term`` to the loss
    and runs its ``after_step`` after each optimizer step (see :class:`TrainingHooks`).
    ``progress`` is a tqdm-like bar (``update`` / ``set_postfix``) or a callable ``(step, metrics)``. History rows are written every ``log_every`` steps (default:
    every step; ``train_loss`` is the mean since the previous row), at each evaluation and at
    the end. A non-finite loss raises :class:`RankwiseError` naming the step, before that step
    changes anything. The model is left in the mode it came in.
    """
    _check_positive("steps", steps)
    _check_positive("eval_every", eval_every)
    _check_positive("log_every", log_every)
    if eval_every is not None and not eval_batches:
        raise RankwiseError("eval_every needs eval_batches to evaluate on")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise RankwiseError(f"max_grad_norm must be positive, got {max_grad_norm}")
    device = _model_device(model)
    on_cuda = device.type == "cuda"
    tracker = None if on_cuda else MemoryTracker(model, optimizer)
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    log_every = log_every or 1
    history: list[dict] = []
    step_seconds: list[float] = []
    window_losses: list[float] = []
    window_regularizers: list[float] = []
    final_val_loss = None
    was_training = model.training
    model.train()
    try:
        for step in range(1, steps + 1):
            batch = _to_device(next(batches), device)
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with tracker.saving_activations() if tracker else contextlib.nullcontext():
                loss = model(**batch).loss
                regularizer = _loss_terms(hooks, model)
                total = loss if regularizer is None else loss + regularizer
            total_value = float(total.detach())
            if not math.isfinite(total_value):
                raise RankwiseError(
                    f"the loss became {total_value} at step {step}; lower the learning rate, "
                    "enable gradient clipping (max_grad_norm) or check the data"
                )
            if tracker:
                tracker.sample()
            # A layerwise optimizer that accumulates N micro-batches steps on their mean gradient.
            (total / getattr(optimizer, "accumulation_steps", 1)).backward()
            if tracker:
                tracker.clear_activations()
                tracker.sample()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            for hook in hooks:
                hook.after_step(model, step=step, total_steps=steps, optimizer=optimizer)
            if tracker:
                tracker.sample()
            if scheduler is not None:
                scheduler.step()
            if on_cuda:
                torch.cuda.synchronize(device)
            step_seconds.append(time.perf_counter() - started)

            window_losses.append(float(loss.detach()))
            if regularizer is not None:
                window_regularizers.append(float(regularizer.detach()))
            evaluate_now = bool(eval_batches) and (step == steps or (eval_every is not None and step % eval_every == 0))
            record: dict[str, Any] = {"step": step, "train_loss": window_losses[-1]}
            if evaluate_now:
                record["val_loss"] = evaluate(model, eval_batches)
                final_val_loss = record["val_loss"] if step == steps else final_val_loss
            if evaluate_now or step % log_every == 0 or step == steps:
                row = {"step": step, "train_loss": sum(window_losses) / len(window_losses)}
                row["lr"] = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else None
                if window_regularizers:
                    row["regularizer"] = sum(window_regularizers) / len(window_regularizers)
                if evaluate_now:
                    row["val_loss"] = record["val_loss"]
                history.append(row)
                window_losses.clear()
                window_regularizers.clear()
            _report_progress(progress, step, record)
    finally:
        model.train(was_training)
    timed = step_seconds[1:] if len(step_seconds) > 1 else step_seconds
    peak_bytes = torch.cuda.max_memory_allocated(device) if on_cuda else tracker.peak_bytes
    return TrainResult(
        history=history,
        final_val_loss=final_val_loss,
        final_val_ppl=None if final_val_loss is None else _perplexity(final_val_loss),
        ms_per_step=1000.0 * sum(timed) / len(timed),
        peak_memory_mb=peak_bytes / MB,
        steps=steps,
    )


def cosine_schedule(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay of every group's learning rate.

    Multiplier at scheduler step ``s`` (step ``s + 1`` of training uses it)::

        s <  w:  (s + 1) / w
        s >= w:  m + (1 - m) * (1 + cos(pi * min(1, (s - w) / max(1, S - w)))) / 2

    with ``w = warmup_steps``, ``S = total_steps``, ``m = min_ratio``: it reaches 1 at the end of
    warm-up and ``min_ratio`` at ``total_steps``, then stays there.
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise RankwiseError(f"total_steps must be a positive integer, got {total_steps!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise RankwiseError(f"warmup_steps must be an integer in [0, total_steps={total_steps}], got {warmup_steps!r}")
    if not 0.0 <= min_ratio <= 1.0:
        raise RankwiseError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
