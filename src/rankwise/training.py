"""The one training loop of rankwise (bench, CLI and the cached base all use it).

Each step::

    optimizer.zero_grad(set_to_none=True)
    with autocast(dtype):                # only if autocast_dtype is given (bf16 mixed precision)
        loss = objective.loss(model, batch) + sum(hook.loss_term(model) for hook in hooks)
    loss.backward()
    clip_grad_norm_(max_grad_norm)       # only if max_grad_norm is given
    optimizer.step()
    hook.after_step(model, step=..., total_steps=..., optimizer=...) for hook in hooks
    scheduler.step()                     # only if given

``hooks`` are :class:`TrainingHooks`: whatever a set-up installed that acts during training
(an adapter method's regulariser or rank schedule, a parametrisation's restarts), whichever
pillar it comes from; the loop knows nothing else about them. ``objective`` is what the
model is trained and evaluated on (:class:`Objective`): next-token prediction by default
(``model(**batch).loss``), masked-LM or hidden-state fidelity for encoders.

Options that change how a step runs, not what it computes:

* ``gradient_checkpointing=True``: transformers' activation checkpointing of every block
  (non-reentrant ``torch.utils.checkpoint`` by default, ``use_reentrant=True`` for the old
  reentrant variant, with input gradients enabled so frozen embeddings still pass gradients
  to adapters); activations inside a block are recomputed in backward instead of stored;
* ``autocast_dtype=torch.bfloat16``: the forward pass and the loss under ``torch.autocast``;
  the parameters, their gradients and the optimizer state stay in the model's dtype (fp32
  master weights for an fp32 model).

and it measures, the same way for every set-up:

* ``ms_per_step`` -- mean wall time of the optimisation steps (zero_grad .. scheduler.step),
  evaluation excluded and the first step excluded as warm-up (lazy state allocation,
  kernel selection) whenever more than one step ran;
* ``peak_memory_mb`` -- on CUDA ``torch.cuda.max_memory_allocated`` (reset at the start);
  elsewhere the peak reported by :class:`MemoryTracker` (definition there).

The validation loss (:func:`evaluate`) is the objective's loss averaged over all the tokens it
scores in the evaluation batches (for the default objective: the mean next-token
cross-entropy over all predicted tokens), and perplexity is ``exp`` of it where the objective
is a cross-entropy. With evaluation batches, the loss before the first step is measured too
(``initial_val_loss``).

A run can be saved every ``save_every`` steps (:func:`save_training_state` from the ``save``
callback) and resumed with :func:`load_training_state` and ``start_step``: the resumed run
computes exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.errors import LossDiverged, RankwiseError

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
    #: the validation loss before the first step (None without eval batches or on a resumed run)
    initial_val_loss: float | None = None


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


def _labelled_tokens(batch: dict) -> int:
    """Tokens with a label in ``batch`` (the masked positions of a masked-LM batch)."""
    labels = batch.get("labels")
    if labels is None:
        raise RankwiseError("masked batches need 'labels' (use rankwise.data.batches.MaskedBatches / masked_eval_batches)")
    return int((labels != IGNORE_INDEX).sum())


def _model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    output = model(**batch)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise RankwiseError(
            f"{type(model).__name__} computed no loss from the batch (keys {sorted(batch)}); an encoder without a "
            "language-model head needs another objective (rankwise.training.hidden_state_fidelity)"
        )
    return loss


@dataclass(frozen=True)
class Objective:
    """What a model is trained and evaluated on.

    ``loss(model, batch)`` is the scalar the step minimises (the mean over the batch's scored
    tokens); ``tokens(batch)`` the number of tokens it averages over, so :func:`evaluate` weights
    batches by it; ``perplexity``: whether ``exp(loss)`` is a perplexity (a cross-entropy).
    """

    name: str
    loss: Callable[[nn.Module, dict], torch.Tensor]
    tokens: Callable[[dict], int]
    perplexity: bool = True


#: next-token prediction: ``model(**batch).loss`` of a causal LM, the mean cross-entropy of the
#: ``T - 1`` predicted tokens of each row (labels = input_ids, shifted inside the model)
CAUSAL_LM = Objective("causal language modelling", _model_loss, _predicted_tokens)
#: masked-LM (BERT, arXiv 1810.04805): ``model(**batch).loss`` of a ``*ForMaskedLM`` on batches
#: whose labels are -100 except at the masked positions (rankwise.data.batches.MaskedBatches);
#: ``exp`` of it is the masked-token perplexity
MASKED_LM = Objective("masked language modelling", _model_loss, _labelled_tokens)


def hidden_state_fidelity(teacher: nn.Module) -> Objective:
    """Masked-input hidden-state fidelity, for an encoder without a language-model head.

    With the masked batch of :class:`rankwise.data.batches.MaskedBatches` (``x~`` = the input
    with 15% of its tokens masked, ``x`` = the original tokens, ``M`` = the masked positions),
    the loss is ::

        mean over i in M, j < d of ( LN(h(x~))_ij - LN(h0(x))_ij )^2

    where ``h`` is the trained model's last hidden state, ``h0`` the frozen ``teacher``'s (the
    model before training) and ``LN`` a layer norm without parameters. The model learns to
    give a masked token the representation the original encoder gives it in context: a
    data2vec-style target (arXiv 2202.03555) with the frozen starting model as teacher, so the
    representation space the encoder's users rely on (sentence embeddings) is kept. The
    teacher is a separate frozen copy: its weights are not part of the measured memory.
    """
    teacher = teacher.eval().requires_grad_(False)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        masked = labels != IGNORE_INDEX
        original = torch.where(masked, labels, batch["input_ids"])
        device = _model_device(model)
        if _model_device(teacher) != device:
            teacher.to(device)
        with torch.no_grad():
            target = teacher(input_ids=original).last_hidden_state
        hidden = model(input_ids=batch["input_ids"]).last_hidden_state
        width = (hidden.shape[-1],)
        predicted = nn.functional.layer_norm(hidden[masked].float(), width)
        wanted = nn.functional.layer_norm(target[masked].float(), width)
        return nn.functional.mse_loss(predicted, wanted)

    return Objective("hidden-state fidelity", loss, _labelled_tokens, perplexity=False)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def evaluate(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    objective: Objective = CAUSAL_LM,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Mean ``objective`` loss over all the tokens it scores in ``batches`` (no grad).

    Each batch's mean loss is weighted by its number of scored tokens (for the default
    objective: predicted tokens), so a short last batch counts for what it holds. The model is
    put in eval mode and its mode restored afterwards.
    """
    batches = list(batches)
    if not batches:
        raise RankwiseError("no evaluation batches given")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), _autocast(device, autocast_dtype):
            for batch in batches:
                tokens = objective.tokens(batch)
                loss = objective.loss(model, _to_device(batch, device))
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


def _check_checkpointing(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise RankwiseError(
            f"gradient checkpointing needs a transformers model that supports it; {type(model).__name__} does not "
            "(drop gradient_checkpointing, or checkpoint its blocks with torch.utils.checkpoint yourself)"
        )


@contextlib.contextmanager
def checkpointing_activations(model: nn.Module, *, use_reentrant: bool = False) -> Iterator[None]:
    """Activation checkpointing of ``model``'s blocks inside this block, then the model's previous setting.

    transformers' ``activation_checkpointing_enable`` (``gradient_checkpointing_enable`` on older
    versions) with ``use_reentrant``; input gradients are enabled (and disabled again) so that
    with frozen embeddings (adapters) the checkpointed blocks still get gradients.
    """
    _check_checkpointing(model)
    was_enabled = bool(getattr(model, "is_gradient_checkpointing", False))
    had_input_hook = hasattr(model, "_require_grads_hook")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if not hasattr(model, "_require_grads_hook") and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    try:
        yield
    finally:
        if not was_enabled:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        if not had_input_hook and hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()


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
    objective: Objective = CAUSAL_LM,
    gradient_checkpointing: bool = False,
    use_reentrant: bool = False,
    autocast_dtype: torch.dtype | None = None,
    start_step: int = 0,
    save_every: int | None = None,
    save: Callable[[int, TrainResult], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimisation steps and measure loss, time and memory.

    ``batches`` yields dicts the objective takes (for the default objective, what the model
    accepts: ``input_ids``, ``labels``, ...); they are moved to the model's device.
    ``eval_batches`` are evaluated before the first step (``initial_val_loss``), every
    ``eval_every`` steps and always after the last step (``final_val_loss``). Each of ``hooks``
    adds its ``loss_term`` to the loss and runs its ``after_step`` after each optimizer step
    (see :class:`TrainingHooks`). ``progress`` is a tqdm-like bar (``update`` / ``set_postfix``)
    or a callable ``(step, metrics)``. History rows are written every ``log_every`` steps
    (default: every step; ``train_loss`` is the mean since the previous row), at each
    evaluation and at the end. A non-finite loss raises :class:`RankwiseError` naming the step,
    before that step changes anything. The model is left in the mode it came in.

    ``gradient_checkpointing`` / ``use_reentrant`` and ``autocast_dtype``: see the module
    docstring. ``start_step``: the steps already done by a run being resumed (its model,
    optimizer, scheduler and batches restored by :func:`load_training_state`); the loop runs
    steps ``start_step + 1 .. steps``. ``save(step, so_far)`` is called after every
    ``save_every``-th step (e.g. to :func:`save_training_state`), ``so_far`` a TrainResult with
    this call's history rows and ``initial_val_loss``.
    """
    _check_positive("steps", steps)
    _check_positive("eval_every", eval_every)
    _check_positive("log_every", log_every)
    _check_positive("save_every", save_every)
    if eval_every is not None and not eval_batches:
        raise RankwiseError("eval_every needs eval_batches to evaluate on")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise RankwiseError(f"max_grad_norm must be positive, got {max_grad_norm}")
    if not isinstance(start_step, int) or not 0 <= start_step < steps:
        raise RankwiseError(f"start_step must be an integer in [0, steps={steps}), got {start_step!r}")
    if (save_every is None) != (save is None):
        raise RankwiseError("save_every and save go together: give both (save(step, so_far) is called every save_every steps)")
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        raise RankwiseError(f"autocast_dtype must be a torch.dtype (e.g. torch.bfloat16), got {autocast_dtype!r}")
    if gradient_checkpointing:
        _check_checkpointing(model)
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
    initial_val_loss = None
    was_training = model.training
    checkpointing = (
        checkpointing_activations(model, use_reentrant=use_reentrant) if gradient_checkpointing
        else contextlib.nullcontext()
    )
    try:
        with checkpointing:
            if eval_batches and start_step == 0:
                initial_val_loss = evaluate(model, eval_batches, objective=objective, autocast_dtype=autocast_dtype)
            model.train()
            for step in range(start_step + 1, steps + 1):
                batch = _to_device(next(batches), device)
                started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                with tracker.saving_activations() if tracker else contextlib.nullcontext():
                    with _autocast(device, autocast_dtype):
                        loss = objective.loss(model, batch)
                        regularizer = _loss_terms(hooks, model)
                        total = loss if regularizer is None else loss + regularizer
                total_value = float(total.detach())
                if not math.isfinite(total_value):
                    raise LossDiverged(
                        f"the loss became {total_value} at step {step}; lower the learning rate, "
                        "enable gradient clipping (max_grad_norm) or check the data", step
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
                    record["val_loss"] = evaluate(model, eval_batches, objective=objective, autocast_dtype=autocast_dtype)
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
                if save is not None and step % save_every == 0:
                    save(step, TrainResult(history=list(history), initial_val_loss=initial_val_loss, steps=step))
                _report_progress(progress, step, record)
    finally:
        model.train(was_training)
    timed = step_seconds[1:] if len(step_seconds) > 1 else step_seconds
    peak_bytes = torch.cuda.max_memory_allocated(device) if on_cuda else tracker.peak_bytes
    ppl = None if final_val_loss is None or not objective.perplexity else _perplexity(final_val_loss)
    return TrainResult(
        history=history,
        final_val_loss=final_val_loss,
        final_val_ppl=ppl,
        ms_per_step=1000.0 * sum(timed) / len(timed),
        peak_memory_mb=peak_bytes / MB,
        steps=steps,
        initial_val_loss=initial_val_loss,
    )


# ---- saving and resuming a run -------------------------------------------------------------

STATE_FILE = "training_state.json"
MODEL_STATE_FILE = "training_model.safetensors"
_TORCH_FILES = ("optimizer", "scheduler", "batches", "rng")


def _plain_attributes(owner: Any) -> dict[str, Any]:
    """The JSON-serialisable instance attributes of ``owner`` (counters, flags, sampled ranks)."""
    found = {}
    for key, value in vars(owner).items():
        if key == "training" or key.startswith("__") or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        found[key] = value
    return found


def _rankwise_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """rankwise's own modules in ``model`` (adapter layers, factorised layers, ...): their plain
    attributes are training state (AdaLoRA's fixed mask, DyLoRA's sampled rank, ...)."""
    for name, module in model.named_modules():
        if type(module).__module__.startswith("rankwise."):
            yield name, module


def _tensor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent buffers too (importance averages, ...)."""
    state = dict(model.state_dict(keep_vars=True))
    for name, buffer in model.named_buffers():
        state.setdefault(name, buffer)
    return state


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_training_state(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    scheduler: Any = None,
    batches: Any = None,
    history: Sequence[dict] = (),
    info: dict[str, Any] | None = None,
    hooks: Sequence[TrainingHooks] = (),
) -> Path:
    """Write what resuming after ``step`` needs into ``directory`` (created; replaced if it exists).

    ``training_model.safetensors``: every parameter and buffer (non-persistent ones too; shared
    tensors once); the plain attributes of rankwise's own modules and of ``hooks`` go into
    ``training_state.json`` (schedules' flags and counters); ``optimizer.pt``,
    ``scheduler.pt``, ``batches.pt`` (a :class:`~rankwise.data.batches.TokenBatches` position) and
    ``rng.pt`` (torch's global generators: dropout): tensors and plain values only, read back
    with ``torch.load(weights_only=True)``; ``training_state.json``: ``step``, ``history`` and
    ``info`` (what the caller needs to check that a resumed run is the same run). The
    directory is written beside its final place and renamed, so an interrupted save leaves
    the previous one intact.
    """
    from safetensors.torch import save_file

    final = Path(directory)
    if final.exists() and not final.is_dir():
        raise RankwiseError(f"{final} exists and is not a directory; choose another checkpoint path")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        tensors, first = {}, {}
        for name, tensor in _tensor_state(model).items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            if key not in first:  # a tied tensor is stored once and re-tied by the model itself
                first[key] = name
                tensors[name] = tensor.detach().to("cpu").contiguous().clone()
        save_file(tensors, str(staging / MODEL_STATE_FILE))
        pieces = {"optimizer": optimizer.state_dict(), "rng": _rng_state(),
                  "scheduler": scheduler.state_dict() if scheduler is not None else None,
                  "batches": batches.state_dict() if batches is not None else None}
        for name, value in pieces.items():
            if value is not None:
                torch.save(value, staging / f"{name}.pt")
        state = {"step": step, "history": list(history), "info": info or {},
                 "module_attributes": {name: _plain_attributes(m) for name, m in _rankwise_modules(model)},
                 "hook_attributes": [_plain_attributes(hook) for hook in hooks]}
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _load_piece(directory: Path, name: str) -> Any:
    path = directory / f"{name}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise RankwiseError(f"{path} cannot be read as saved training state ({exc}); resume from another checkpoint") from None


def read_training_state(directory: str | Path) -> dict[str, Any]:
    """``{"step", "history", "info"}`` of a directory written by :func:`save_training_state`."""
    from rankwise.files import read_json_object

    path = Path(directory)
    state = read_json_object(path, STATE_FILE, what="checkpoint directory",
                             fix="pass a checkpoint-<step> directory written with --save-steps")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("history"), list):
        raise RankwiseError(f"{path / STATE_FILE} has no step / history; it is not a rankwise checkpoint")
    if not (path / MODEL_STATE_FILE).is_file():
        raise RankwiseError(f"{path} has no {MODEL_STATE_FILE}; the checkpoint is incomplete -- resume from another one")
    return state


def load_training_state(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    batches: Any = None,
    hooks: Sequence[TrainingHooks] = (),
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into the objects built for the same run;
    return ``{"step", "history", "info"}``. The model must have the saved structure (build and
    prepare it as the saved run did): names or shapes that differ raise before anything is loaded."""
    from safetensors import safe_open

    path = Path(directory)
    state = read_training_state(path)
    with safe_open(str(path / MODEL_STATE_FILE), framework="pt") as handle:
        saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    targets = _tensor_state(model)
    expected = {key: tuple(value.shape) for key, value in targets.items()}
    differing = sorted(k for k in saved if k in expected and saved[k] != expected[k])
    unknown = sorted(set(saved) - set(expected))
    attributes = state.get("module_attributes", {})
    unknown += sorted(set(attributes) - {name for name, _ in _rankwise_modules(model)})
    if len(state.get("hook_attributes", [])) not in (0, len(hooks)):
        unknown.append(f"{len(state['hook_attributes'])} training hooks")
    if differing or unknown:
        raise RankwiseError(
            f"{path} was saved from another model (shapes differ at {differing[:3]}, unknown tensors {unknown[:3]}); "
            "resume with the same model, method and options as the saved run"
        )
    pieces = {name: _load_piece(path, name) for name in _TORCH_FILES}
    for name, target in (("scheduler", scheduler), ("batches", batches)):
        if target is not None and pieces[name] is None:
            raise RankwiseError(f"{path} holds no {name} state; resume from a checkpoint written by the same kind of run")
    try:  # checks the groups and their sizes before it changes anything
        optimizer.load_state_dict(pieces["optimizer"])
    except (ValueError, KeyError) as exc:
        raise RankwiseError(f"{path}: the optimizer state does not fit this optimizer ({exc}); resume with the "
                            "same optimizer and options as the saved run") from None
    if batches is not None:
        batches.load_state_dict(pieces["batches"])
    if scheduler is not None:
        scheduler.load_state_dict(pieces["scheduler"])
    with safe_open(str(path / MODEL_STATE_FILE), framework="pt") as handle, torch.no_grad():
        for key in handle.keys():
            target = targets[key]
            target.copy_(handle.get_tensor(key).to(device=target.device, dtype=target.dtype))
    for name, values in attributes.items():
        module = model.get_submodule(name) if name else model
        for key, value in values.items():
            setattr(module, key, tuple(value) if isinstance(getattr(module, key, None), tuple) else value)
    for hook, values in zip(hooks, state.get("hook_attributes", [])):
        for key, value in values.items():
            setattr(hook, key, tuple(value) if isinstance(getattr(hook, key, None), tuple) else value)
    rng = pieces["rng"] or {}
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


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
