"""``rankwise.compensate``: a low-rank correction of what compression or quantization lost, as a LoRA adapter.

``compensate(compressed, original, method="eora", rank=r, data=batches)`` compares every
targeted layer of ``compressed`` with the layer of the same name in ``original`` (the dense
model it came from), computes each layer's correction ``B A`` of ``D = W - W_c`` with the
method (``COMPENSATORS``; EoRA is the one registered, :mod:`rankwise.compress.eora`) from the
inputs the compressed model's layers receive on ``data``, and installs it in ``compressed``:

- on a dense-kind layer (``nn.Linear``, a pruned one, or a bitsandbytes-quantized one) as a
  LoRA adapter through the adapter API (``rankwise.adapt(..., "lora", rank=r, alpha=r)``,
  then its factors set to ``A``, ``B``; scaling 1): the model is then an adapted model --
  ``rankwise.export_peft`` writes it as a PEFT LoRA on the compressed base, and the
  correction trains like any LoRA (EoRA's "fine-tune from here");
- on a :class:`~rankwise.nn.FactorizedLinear` into its own factors (``up = [U, B]``,
  ``down = [V; A]``, rank ``k + r``): a factorised layer already is two factors, and neither
  rankwise's adapters nor PEFT wrap it.

Layers whose weight equals the original's are left alone; layers without a same-shaped
counterpart in ``original`` (MoDeGPT's smaller matrices) are skipped and listed. The
report, ``model.rankwise_compensation``, gives per layer the form and the relative output
error on the calibration inputs, ``sqrt(tr(E C E^T) / tr(W C W^T))``, before (``E = D``) and
after (``E = D - B A``). Everything is computed before anything is installed; a failure
leaves the model as it was.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from rankwise.calibration import collect_layer_inputs, materialise_data
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight, features, is_linear_like
from rankwise.linalg.covariance import CovarianceAccumulator
from rankwise.nn import FactorizedLinear, select_linear_layers
from rankwise.options import Option
from rankwise.registry import Registry
from rankwise.targets import Targets, replace_module

#: name -> correction(error (m x n), input Gram (n x n), rank) -> (B (m x r), A (r x n))
COMPENSATORS: Registry[Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = Registry(
    "compensation method")

RANK = Option(32, int, low=1, help="rank r of the correction B A (EoRA's docs: 32)")


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, FactorizedLinear) else features(module)[1]


def _matrix(module: nn.Module) -> torch.Tensor:
    return (module.dense_weight().detach() if isinstance(module, FactorizedLinear) else dense_weight(module)).to(
        torch.float64)


def _relative_error(error: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    denominator = float(((weight @ gram) * weight).sum())
    return math.sqrt(max(float(((error @ gram) * error).sum()), 0.0) / denominator) if denominator > 0 else 0.0


def _pairs(compressed: nn.Module, original: nn.Module, targets: Targets) -> tuple[list[str], dict[str, str]]:
    names = select_linear_layers(compressed, targets, include_factorized=True, kind=None)
    chosen, skipped = [], {}
    for name in names:
        module = compressed.get_submodule(name)
        try:
            source = original.get_submodule(name)
        except AttributeError:
            skipped[name] = "no layer of that name in the original model"
            continue
        shape = (module.out_features, module.in_features) if isinstance(module, FactorizedLinear) else features(module)
        if not is_linear_like(source) or features(source) != shape:
            skipped[name] = "its counterpart in the original model has another shape (a structured compression)"
            continue
        chosen.append(name)
    return chosen, skipped


def _folded(layer: FactorizedLinear, up: torch.Tensor, down: torch.Tensor) -> FactorizedLinear:
    dtype = layer.up.weight.dtype
    return FactorizedLinear.from_factors(
        torch.cat([layer.up.weight.detach(), up.to(dtype)], dim=1),
        torch.cat([layer.down.weight.detach(), down.to(dtype)], dim=0),
        layer.bias, source_kind=layer.source_kind,
    ).train(layer.training)


def compensate(
    compressed_or_quantized: nn.Module,
    original: nn.Module,
    method: str = "eora",
    *,
    rank: int = 32,
    data: Iterable[Any] | None = None,
    targets: Targets = "all-linear",
) -> nn.Module:
    """Add the low-rank correction of each targeted layer of ``compressed_or_quantized`` towards ``original``.

    ``data``: calibration batches (dicts of model inputs, or input-id tensors) the compressed
    model accepts. Returns the compressed model, changed in place: LoRA adapters on its
    dense-kind layers (the model's only trainable parameters are then the adapters', as after
    ``rankwise.adapt``), the correction folded into its FactorizedLinear layers; the report in
    ``model.rankwise_compensation``.
    """
    model = compressed_or_quantized
    correction = COMPENSATORS.get(method)
    rank = RANK.check("rank", rank, owner=f"compensation method {method!r}")
    if data is None:
        raise RankwiseError(f"compensation method {method!r} is data-driven: pass data= (batches the compressed model "
                            "accepts; the correction is fitted to the inputs its layers receive)")
    batches = materialise_data(data)
    names, skipped = _pairs(model, original, targets)
    for name in names:
        shape = _matrix(model.get_submodule(name)).shape
        if rank > min(shape):
            raise RankwiseError(f"rank {rank} exceeds min(out, in) = {min(shape)} of layer {name!r}; "
                                "lower rank or leave that layer out of targets")
    errors = {}
    for name in names:
        target = _matrix(original.get_submodule(name))
        error = target - _matrix(model.get_submodule(name)).to(target.device)
        if bool(error.abs().max() > 0):
            errors[name] = error
        else:
            skipped[name] = "its weight equals the original's: nothing to compensate"
    if not errors:
        raise RankwiseError("no targeted layer of the compressed model differs from the original "
                            f"({len(skipped)} skipped); pass the model it was compressed from as original")
    grams = collect_layer_inputs(model, list(errors), batches,
                                 lambda m: CovarianceAccumulator(_in_features(m), dtype=torch.float64))
    report: dict[str, dict[str, Any]] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, error in errors.items():
        if grams[name].count == 0:
            skipped[name] = "it saw no calibration rows"
            continue
        gram = grams[name].second_moment().to(error.device)
        up, down = correction(error, gram, rank)
        weight = _matrix(original.get_submodule(name)).to(error.device)
        form = "factors" if isinstance(model.get_submodule(name), FactorizedLinear) else "lora"
        factors[name] = (up, down)
        report[name] = {"form": form, "rank": rank,
                        "relative_output_error_before": _relative_error(error, weight, gram),
                        "relative_output_error_after": _relative_error(error - up @ down, weight, gram)}
    _install(model, factors, report)
    model.rankwise_compensation = {"method": method, "rank": rank, "layers": report, "skipped": skipped}
    return model


def _install(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], report: dict) -> None:
    """Fold into FactorizedLinear layers, LoRA adapters elsewhere; all or nothing."""
    from rankwise.adapters import adapt, adapter_layers

    folded = {name: _folded(model.get_submodule(name), *factors[name])
              for name in factors if report[name]["form"] == "factors"}
    lora = {name: factors[name] for name in factors if report[name]["form"] == "lora"}
    originals = {name: replace_module(model, name, layer) for name, layer in folded.items()}
    try:
        if lora:
            rank = next(iter(report[name]["rank"] for name in lora))
            adapt(model, "lora", rank=rank, alpha=float(rank), targets=list(lora))
            layers = adapter_layers(model)
            with torch.no_grad():
                for name, (up, down) in lora.items():
                    parameters = layers[name].lora_parameters()
                    parameters.A.copy_(down.to(parameters.A))
                    parameters.B.copy_((up / parameters.scaling).to(parameters.B))
    except BaseException as exc:
        for name, layer in originals.items():
            replace_module(model, name, layer)
        if isinstance(exc, RankwiseError) or not isinstance(exc, Exception):
            raise
        raise RankwiseError(f"rankwise.adapt cannot wrap these layers ({type(exc).__name__}: {exc}); "
                            "compensate needs LoRA adapters on them") from exc
