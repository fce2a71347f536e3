"""Per-layer statistics gathered from calibration data, shared by every data-driven method.

A data-driven method (adapter init, compression) declares, e.g. on its :class:`~rankwise.adapters.base.AdapterLayer`
subclass, ``statistics = ("input_covariance", ...)``; ``adapt`` runs the data through the
UNMODIFIED model once per kind of statistic and hands each layer its
:class:`LayerStatistics`. Kinds:

- ``"input_covariance"`` -- a :class:`~rankwise.linalg.covariance.CovarianceAccumulator`
  over the layer's input rows (``X^T X``, mean, count; CorDA, ASVD-style scaling).
- ``"input_batches"``    -- a list with one ``tokens x in`` float32 matrix per batch (EVA's
  minibatch SVD). Memory grows with the data: pass few, short batches.
- ``"weight_gradient"``  -- ``mean_b dL_b/dW`` (``out x in``, float32) of the full base weight,
  ``L_b`` being the model's own loss (``output.loss``; batches need ``labels``) (LoRA-GA,
  LoRA-SB).

Collection runs in eval mode (dropout off, so it is deterministic), restores the train/eval
mode, every ``requires_grad`` flag and every existing ``.grad`` afterwards, and never writes
to a parameter. A batch the model cannot run raises :class:`RankwiseError` naming the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.linalg.covariance import CovarianceAccumulator

STATISTIC_KINDS = ("input_covariance", "input_batches", "weight_gradient")


@dataclass
class LayerStatistics:
    """What the data said about one targeted layer; fields not requested stay None."""

    input_covariance: CovarianceAccumulator | None = None
    input_batches: list[torch.Tensor] | None = None
    weight_gradient: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # for methods that override collect_statistics


def model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def run_batch(model: nn.Module, batch: Any, index: int = 0) -> Any:
    """``model(**batch)`` for a dict, ``model(batch)`` for a tensor; tensors moved to the model's device."""
    device = model_device(model)
    try:
        if isinstance(batch, dict):
            return model(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()})
        if torch.is_tensor(batch):
            return model(batch.to(device))
    except RankwiseError:
        raise
    except Exception as exc:  # the user's batch does not fit the model: say which one
        raise RankwiseError(
            f"data batch {index} does not fit the model ({type(exc).__name__}: {exc}); "
            "pass batches the model accepts, e.g. dict(input_ids=..., attention_mask=..., labels=...)"
        ) from exc
    raise RankwiseError(
        f"data batch {index} is a {type(batch).__name__}; pass dicts of model inputs (model(**batch)) or tensors"
    )


def materialise_data(data: Iterable[Any]) -> list[Any]:
    """Turn ``data`` into a non-empty list so several passes see the same batches."""
    if isinstance(data, (dict, torch.Tensor)):
        raise RankwiseError("data must be an iterable of batches (e.g. a list of dicts), not a single batch")
    try:
        batches = list(data)
    except TypeError:
        raise RankwiseError(f"data must be an iterable of batches, got {type(data).__name__}") from None
    if not batches:
        raise RankwiseError("data is empty; pass at least one batch")
    return batches


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def collect_layer_inputs(
    model: nn.Module,
    layer_names: list[str],
    data: list[Any],
    make_reducer: Callable[[nn.Module], Any],
) -> dict[str, Any]:
    """Feed the input of each named layer, as ``tokens x in`` rows, to its reducer.

    ``make_reducer(module)`` builds one object with an ``update(rows)`` method per layer
    (e.g. ``lambda m: CovarianceAccumulator(m.in_features)``); the reducers are returned.
    """
    reducers = {name: make_reducer(model.get_submodule(name)) for name in layer_names}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            reducers[name].update(x.detach().reshape(-1, x.shape[-1]))

        return hook

    try:
        for name in layer_names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
        with _eval_mode(model), torch.no_grad():
            for index, batch in enumerate(data):
                run_batch(model, batch, index)
    finally:
        for handle in handles:
            handle.remove()
    return reducers


class _BatchList:
    """Reducer that keeps every batch's input rows (float32)."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def update(self, rows: torch.Tensor) -> None:
        self.batches.append(rows.to(torch.float32).clone())


def _model_loss(output: Any, index: int) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and torch.is_tensor(output) and output.ndim == 0:
        loss = output
    if loss is None:
        raise RankwiseError(
            f"data batch {index} gave no loss; gradient-based inits need batches with labels "
            "(e.g. dict(input_ids=..., labels=...)) for a model that returns .loss"
        )
    return loss


def collect_weight_gradients(model: nn.Module, layer_names: list[str], data: list[Any]) -> dict[str, torch.Tensor]:
    """``mean over batches of dL/dW`` (float32) for the weight of each named Linear layer.

    Only the named weights require grad during the passes; every flag and existing gradient
    of the model is restored afterwards.
    """
    params = dict(model.named_parameters())
    saved_flags = {name: p.requires_grad for name, p in params.items()}
    saved_grads = {name: p.grad for name, p in params.items()}
    weights = {name: model.get_submodule(name).weight for name in layer_names}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        with _eval_mode(model):
            for index, batch in enumerate(data):
                _model_loss(run_batch(model, batch, index), index).backward()
                for name, w in weights.items():
                    if w.grad is not None:
                        sums[name] += w.grad.to(torch.float32)
                        w.grad = None
    finally:
        for name, p in params.items():
            p.requires_grad_(saved_flags[name])
            p.grad = saved_grads[name]
    return {name: total / len(data) for name, total in sums.items()}


def collect_statistics(
    model: nn.Module, layer_names: list[str], data: list[Any], kinds: Iterable[str]
) -> dict[str, LayerStatistics]:
    """One :class:`LayerStatistics` per layer holding the requested ``kinds``."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in STATISTIC_KINDS]
    if unknown:
        raise ValueError(f"unknown statistic kinds {unknown}; known: {', '.join(STATISTIC_KINDS)}")
    stats = {name: LayerStatistics() for name in layer_names}
    if "input_covariance" in kinds:
        reducers = collect_layer_inputs(model, layer_names, data, lambda m: CovarianceAccumulator(m.in_features))
        for name, reducer in reducers.items():
            stats[name].input_covariance = reducer
    if "input_batches" in kinds:
        reducers = collect_layer_inputs(model, layer_names, data, lambda m: _BatchList())
        for name, reducer in reducers.items():
            stats[name].input_batches = reducer.batches
    if "weight_gradient" in kinds:
        for name, grad in collect_weight_gradients(model, layer_names, data).items():
            stats[name].weight_gradient = grad
    return stats
