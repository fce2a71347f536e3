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
  ``L_b`` being the model's own loss (``output.loss``; batches need ``labels``) or, for models
  that compute none (encoders, custom heads), ``loss_fn(model, batch)`` (LoRA-GA, LoRA-SB).
  It is read from the layer's input rows ``x`` and output gradients ``g`` (``dL/dW = sum g^T x``
  for ``y = x W^T + b``), so it works on every Linear-like layer -- GPT-2's Conv1D, a quantized
  bitsandbytes layer (the gradient of its dequantized matrix) or a module holding adapters --
  without making any weight trainable.

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


def batch_on_device(model: nn.Module, batch: Any) -> Any:
    """``batch`` with its tensors moved to the model's device (dicts and tensors; anything else as is)."""
    device = model_device(model)
    if isinstance(batch, dict):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def run_batch(model: nn.Module, batch: Any, index: int = 0) -> Any:
    """``model(**batch)`` for a dict, ``model(batch)`` for a tensor; tensors moved to the model's device."""
    try:
        if isinstance(batch, dict):
            return model(**batch_on_device(model, batch))
        if torch.is_tensor(batch):
            return model(batch_on_device(model, batch))
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
            f"data batch {index} gave no loss; gradient-based inits need a loss: batches with labels "
            "(e.g. dict(input_ids=..., labels=...)) for a model that returns .loss, or -- for a model that "
            "computes none of its own (an encoder such as AutoModel, a custom head) -- pass "
            "loss_fn=lambda model, batch: <scalar loss> to adapt"
        )
    return loss


def batch_loss(model: nn.Module, batch: Any, index: int, loss_fn: Callable[[nn.Module, Any], Any] | None) -> torch.Tensor:
    """The loss of one batch: ``loss_fn(model, batch)`` when given, else the model's own ``.loss``."""
    if loss_fn is None:
        return _model_loss(run_batch(model, batch, index), index)
    try:
        loss = loss_fn(model, batch_on_device(model, batch))
    except RankwiseError:
        raise
    except Exception as exc:
        raise RankwiseError(f"loss_fn failed on data batch {index} ({type(exc).__name__}: {exc})") from exc
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise RankwiseError(f"loss_fn must return a scalar tensor; on data batch {index} it returned "
                            f"{type(loss).__name__}{tuple(loss.shape) if torch.is_tensor(loss) else ''}")
    return loss.reshape(())


def collect_weight_gradients(
    model: nn.Module,
    layer_names: list[str],
    data: list[Any],
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """``mean over batches of dL/dW`` (float32, ``out x in``) for the weight of each named Linear-like layer.

    ``dL/dW = sum over rows of g^T x`` with ``x`` the layer's input rows and ``g = dL/dy`` its output
    gradient, captured by hooks; no parameter is made trainable and no ``.grad`` is written (an
    input that does not require grad is flagged to, so the loss reaches every targeted layer).
    """
    sums: dict[str, torch.Tensor] = {}
    captured: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (layer, input rows, output) of this batch
    handles = []

    def before(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if torch.is_tensor(x) and x.is_floating_point() and not x.requires_grad:
            # nothing upstream is tracked, so a tracked alias loses no gradient and leaves the caller's tensor alone
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def after_for(name: str):
        def after(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if torch.is_tensor(output) and output.requires_grad:
                captured.append((name, args[0].detach().reshape(-1, args[0].shape[-1]), output))

        return after

    try:
        for name in layer_names:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after_for(name)))
        with _eval_mode(model), torch.enable_grad():
            for index, batch in enumerate(data):
                captured.clear()
                loss = batch_loss(model, batch, index, loss_fn)
                if not captured or not loss.requires_grad:
                    continue
                # autograd.grad, not backward: no parameter's .grad is written
                grads = torch.autograd.grad(loss, [out for _, _, out in captured], allow_unused=True)
                for (name, rows, _), grad in zip(captured, grads):
                    if grad is not None:
                        outer = grad.reshape(-1, grad.shape[-1]).float().T @ rows.float()
                        sums[name] = outer if name not in sums else sums[name] + outer
                captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name in layer_names:
        module = model.get_submodule(name)
        out_features, in_features = _matrix_shape(module)
        total = sums.get(name)
        if total is None:
            total = torch.zeros(out_features, in_features, dtype=torch.float32, device=model_device(model))
        result[name] = total / len(data)
    return result


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    from rankwise.layers import features

    base = getattr(module, "base", module)  # a module holding adapters: its base layer
    return features(base)


def collect_statistics(
    model: nn.Module,
    layer_names: list[str],
    data: list[Any],
    kinds: Iterable[str],
    loss_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, LayerStatistics]:
    """One :class:`LayerStatistics` per layer holding the requested ``kinds``."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in STATISTIC_KINDS]
    if unknown:
        raise ValueError(f"unknown statistic kinds {unknown}; known: {', '.join(STATISTIC_KINDS)}")
    stats = {name: LayerStatistics() for name in layer_names}
    if "input_covariance" in kinds:
        reducers = collect_layer_inputs(model, layer_names, data, lambda m: CovarianceAccumulator(_matrix_shape(m)[1]))
        for name, reducer in reducers.items():
            stats[name].input_covariance = reducer
    if "input_batches" in kinds:
        reducers = collect_layer_inputs(model, layer_names, data, lambda m: _BatchList())
        for name, reducer in reducers.items():
            stats[name].input_batches = reducer.batches
    if "weight_gradient" in kinds:
        for name, grad in collect_weight_gradients(model, layer_names, data, loss_fn).items():
            stats[name].weight_gradient = grad
    return stats
