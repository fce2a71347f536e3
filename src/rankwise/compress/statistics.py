"""The calibration statistics compression methods read, for every Linear-like layer kind.

A :class:`~rankwise.compress.core.Compressor` names what it needs in ``calibration``;
:func:`collect` runs the data through the UNMODIFIED model (eval mode, no parameter written;
see :mod:`rankwise.calibration`) and returns one :class:`~rankwise.calibration.LayerStatistics`
per layer. Inputs are the layer's input rows ``x`` (``tokens x n``), whatever the layer's
storage (Linear, Conv1D, bitsandbytes), so ``n`` is :func:`rankwise.layers.features`' ``in``.

- ``"input_covariance"``: ``C = sum_t x_t x_t^T`` (``n x n``) accumulated in float64 (SVD-LLM's
  whitening, EoRA, MoDeGPT's correlations), in ``stats.input_covariance``;
- ``"input_abs_mean"``: ``mean_t |x_t|`` per input channel, float64 (ASVD's scaling), in
  ``stats.extra["input_abs_mean"]``;
- ``"weight_fisher"``: the empirical Fisher ``mean_b (dL_b / dW)^2`` (``m x n``, float32, the
  dense ``out x in`` orientation) of each batch's loss ``L_b`` (FWSVD), in
  ``stats.extra["weight_fisher"]``. ``L_b`` is ``loss_fn(model, batch)`` when given, else the
  model's own ``output.loss`` (batches with labels).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from rankwise.calibration import LayerStatistics, collect_layer_inputs, run_batch
from rankwise.errors import RankwiseError
from rankwise.layers import features, layer_kind
from rankwise.linalg.covariance import CovarianceAccumulator

KINDS = ("input_covariance", "input_abs_mean", "weight_fisher")

#: ``loss_fn(model, batch) -> scalar tensor`` for models that compute no loss of their own
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class _AbsMean:
    """Reducer: running ``sum |x|`` per channel and the row count."""

    def __init__(self, dim: int) -> None:
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.count = 0

    def update(self, rows: torch.Tensor) -> None:
        self.total = self.total.to(rows.device) + rows.detach().abs().sum(dim=0).to(torch.float64)
        self.count += rows.shape[0]

    def value(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def batch_loss(model: nn.Module, batch: Any, index: int, loss_fn: LossFn | None, need: str) -> torch.Tensor:
    """``loss_fn(model, batch)``, else the model's ``output.loss``; RankwiseError saying what to pass."""
    if loss_fn is not None:
        loss = loss_fn(model, batch)
        if not torch.is_tensor(loss) or loss.ndim != 0:
            raise RankwiseError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} for batch {index}")
        return loss
    output = run_batch(model, batch, index)
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise RankwiseError(
            f"{need} needs a loss, and data batch {index} gave none: pass batches with labels for a model that "
            "returns .loss, or loss_fn=lambda model, batch: <scalar tensor> (e.g. for an encoder)"
        )
    return loss


def weight_fisher(
    model: nn.Module, names: list[str], data: list[Any], loss_fn: LossFn | None, need: str
) -> dict[str, torch.Tensor]:
    """``mean_b (dL_b/dW)^2`` (out x in, float32) of each named layer's weight; every
    ``requires_grad`` flag and existing ``.grad`` of the model is restored afterwards."""
    params = dict(model.named_parameters())
    saved_flags = {name: p.requires_grad for name, p in params.items()}
    saved_grads = {name: p.grad for name, p in params.items()}
    modules = {name: model.get_submodule(name) for name in names}
    sums = {name: torch.zeros(features(m), dtype=torch.float32, device=m.weight.device) for name, m in modules.items()}
    was_training = model.training
    try:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        for module in modules.values():
            module.weight.requires_grad_(True)
        model.eval()
        for index, batch in enumerate(data):
            with torch.enable_grad():  # compress plans under no_grad
                batch_loss(model, batch, index, loss_fn, need).backward()
            for name, module in modules.items():
                grad = module.weight.grad
                if grad is not None:
                    grad = grad.T if layer_kind(module) == "conv1d" else grad
                    sums[name] += grad.to(torch.float32).square()
                    module.weight.grad = None
    finally:
        model.train(was_training)
        for name, p in params.items():
            p.requires_grad_(saved_flags[name])
            p.grad = saved_grads[name]
    return {name: total / len(data) for name, total in sums.items()}


def collect(
    model: nn.Module, names: list[str], data: list[Any], kinds: Iterable[str], *,
    loss_fn: LossFn | None = None, need: str = "this method",
) -> dict[str, LayerStatistics]:
    """One :class:`LayerStatistics` per named layer holding the requested ``kinds``."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown statistic kinds {unknown}; known: {', '.join(KINDS)}")
    stats = {name: LayerStatistics() for name in names}
    if "input_covariance" in kinds:
        reducers = collect_layer_inputs(
            model, names, data, lambda m: CovarianceAccumulator(features(m)[1], dtype=torch.float64))
        for name, reducer in reducers.items():
            stats[name].input_covariance = reducer
    if "input_abs_mean" in kinds:
        reducers = collect_layer_inputs(model, names, data, lambda m: _AbsMean(features(m)[1]))
        for name, reducer in reducers.items():
            stats[name].extra["input_abs_mean"] = reducer.value()
    if "weight_fisher" in kinds:
        for name, fisher in weight_fisher(model, names, data, loss_fn, need).items():
            stats[name].extra["weight_fisher"] = fisher
    return stats
