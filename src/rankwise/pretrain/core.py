"""Parametrisations for training from scratch: the contract, ``parametrize`` and the options.

A parametrisation replaces each targeted dense Linear-like layer of a (freshly initialised)
model -- ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), read through
:mod:`rankwise.layers` as an ``out x in`` matrix -- by a module with fewer trainable
parameters: ``W = B A`` of rank ``r``, a sparse-plus-low-rank sum, a product of
block-diagonal matrices, ... The dense layer is read for its shape, dtype, device, bias and
its fresh initial weight (some methods start from its SVD). Every replacement module
exposes ``in_features``, ``out_features``, ``bias`` and ``dense_weight()`` (the ``out x in``
matrix it applies, ``forward(x) == x @ dense_weight().T + bias``), so
``rankwise.densify`` turns a parametrised model back into a plain one.

**Adding a method** = one file with a :class:`Parametrisation` subclass registered in
``PARAMETRISATIONS`` (with its family, paper and arXiv id) and imported by
``pretrain/__init__.py``: ``OPTIONS`` declares its keyword options as
:class:`rankwise.options.Option` (the base class checks them once and stores the values in
``self.options``), :meth:`Parametrisation.check` validates one layer (rank bounds, block
divisibility), :meth:`Parametrisation.build` returns the replacement module. A method that
acts during training (ReLoRA's merge-and-restart, SST's resampling) overrides the
:class:`~rankwise.training.TrainingHooks` method ``after_step`` it inherits; one that needs
its own learning-rate schedule (ReLoRA's jagged cosine) overrides :meth:`Parametrisation.schedule`.
:meth:`Parametrisation.apply` checks every layer before it builds any and builds all before
it swaps any, so a bad call leaves the model untouched. Then one row in
``tests/cases/pretrain_*.py``.

Optimizers. ``rankwise.optim.build`` projects the 2-D weights of the Linear-like layers a
model holds. Methods whose trainable matrices are ``nn.Linear`` sub-modules (``W = B A``
factors: lowrank, relora, sltrain, lost, structured_ffn's lowrank) declare
``trains_linear_weights = True``: every projected optimizer takes them (it projects the
factors). Methods whose trainable tensors are block-diagonal stacks or spectral pieces
(monarch, SST, the block structures) leave no Linear weight to project in the layers they
replace; :func:`optimizer_support` says, per optimizer, whether it can train a model
parametrised by a method and why not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight as layer_dense_weight
from rankwise.layers import features, is_quantized, layer_kind
from rankwise.nn import FactorizedLinear
from rankwise.options import Option, declared_options, resolve
from rankwise.registry import Registry
from rankwise.targets import Targets, match_targets, replace_module
from rankwise.training import TrainingHooks, cosine_schedule

#: the per-layer rank most parametrisations take (a keyword of ``parametrize``, not an option)
RANK = Option(1, int, low=1, help="rank of each replaced layer")


@dataclass(frozen=True)
class DenseLayer:
    """One targeted Linear-like layer seen as ``y = x W^T + b`` with ``W`` of shape ``out x in``.

    ``weight`` is a detached ``out x in`` view of the layer's weight (transposed for Conv1D),
    ``bias`` its bias parameter or None.
    """

    name: str
    module: nn.Module
    out_features: int
    in_features: int
    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, name: str, module: nn.Module) -> "DenseLayer":
        out_features, in_features = features(module)
        bias = getattr(module, "bias", None)
        return cls(name, module, out_features, in_features, layer_dense_weight(module), bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def init_std(self) -> float:
        """Root mean square of the fresh weight: the scale of whatever init the model uses."""
        return float(self.weight.detach().float().pow(2).mean().sqrt())


class ParametrisedLayer:
    """Mixin of every replacement module: what ``densify`` and the tests rely on.

    Subclasses are ``nn.Module`` s with ``in_features``, ``out_features``, ``bias`` and
    :meth:`dense_weight`; :func:`bias_parameter` copies the dense layer's bias.
    """

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def bias_parameter(layer: DenseLayer) -> nn.Parameter | None:
    """A trainable copy of the dense layer's bias (kept as initialised), or None."""
    if layer.bias is None:
        return None
    return nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)


def _inside_parametrised(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = model.get_submodule(".".join(parts[:cut]))
        if isinstance(parent, (FactorizedLinear, ParametrisedLayer)):
            return True
    return False


def select_dense_layers(model: nn.Module, targets: Targets) -> dict[str, DenseLayer]:
    """The dense Linear-like layers ``targets`` selects (``nn.Linear``, Conv1D), in module order.

    Layers inside an existing parametrisation (a FactorizedLinear's factors, ReLoRA's
    ``lora_A``) are never selected; a quantized layer is refused (pretraining replaces float
    weights). Raises RankwiseError, before anything is changed, when nothing is left.
    """
    chosen = [n for n in match_targets(model, targets) if not _inside_parametrised(model, n)]
    if not chosen:
        raise RankwiseError(
            f"targets {targets!r} matched only layers that are already FactorizedLinear or parametrised; "
            "choose dense layers (a layer cannot be parametrised twice)"
        )
    layers: dict[str, DenseLayer] = {}
    for name in chosen:
        module = model.get_submodule(name)
        if is_quantized(module):
            raise RankwiseError(
                f"{name} is a quantized {layer_kind(module)} layer; parametrisations replace float weights of a "
                "model trained from scratch: leave it out of targets or load the model unquantized"
            )
        layers[name] = DenseLayer.of(name, module)
    return layers


class Parametrisation(TrainingHooks, ABC):
    """Builds the replacement of one dense layer; ``rank`` is the per-layer rank.

    ``uses_rank``: whether the method takes a rank (Monarch and the block structures are
    sized by their number of blocks instead). ``default_targets``: the layers it replaces when
    ``parametrize`` is given no targets. ``trains_linear_weights``: whether its trainable
    matrices are ``nn.Linear`` sub-modules a projected optimizer can take (see
    :func:`optimizer_support`). ``zero_factor_at_init``: whether one of them starts at zero
    (``B = 0``), which an optimizer that normalises each weight's rows can never move.

    Its training-time hooks (``loss_term``, ``after_step``) do nothing unless a method
    overrides them; the bench installs the instance as a hook of the training loop and asks
    :meth:`schedule` for the learning-rate schedule.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {}
    uses_rank: ClassVar[bool] = True
    default_targets: ClassVar[Targets] = "all-linear"
    trains_linear_weights: ClassVar[bool] = True
    zero_factor_at_init: ClassVar[bool] = False

    def __init__(self, rank: int | None = None, *, method: str = "", **options: Any) -> None:
        self.method = method or type(self).__name__
        self.owner = f"pretraining parametrisation {self.method!r}"
        self.options = resolve(declared_options(type(self)), options, owner=self.owner)
        self.rank = self._check_rank(rank)

    def needs_rank(self) -> bool:
        """Whether this configuration takes a rank (a method may decide from its options)."""
        return self.uses_rank

    def _check_rank(self, rank: int | None) -> int | None:
        if not self.needs_rank():
            if rank is not None:
                raise RankwiseError(
                    f"{self.owner} takes no rank (its size is set by its options: "
                    f"{', '.join(sorted(self.options)) or 'none'}); drop rank={rank!r}"
                )
            return None
        if rank is None:
            raise RankwiseError(f"{self.owner} needs a rank (give rank=..., or --rank on the command line)")
        return RANK.check("rank", rank, self.owner)

    def check(self, layer: DenseLayer) -> None:
        """Raise RankwiseError if this layer cannot take the parametrisation."""
        if self.rank is None:
            return
        limit = min(layer.in_features, layer.out_features)
        if self.rank > limit:
            raise RankwiseError(
                f"rank {self.rank} exceeds min(out, in) = {limit} of {layer.name} "
                f"({layer.out_features} x {layer.in_features}); "
                f"use rank <= {limit} or leave that layer out of targets"
            )

    @abstractmethod
    def build(self, layer: DenseLayer) -> nn.Module:
        """The module that replaces ``layer`` (called only after :meth:`check` passed)."""

    def apply(self, model: nn.Module, targets: Targets | None = None) -> nn.Module:
        """Replace the targeted dense layers of ``model`` in place; unchanged on any error."""
        layers = select_dense_layers(model, self.default_targets if targets is None else targets)
        for layer in layers.values():
            self.check(layer)
        with torch.no_grad():
            replacements = {name: self.build(layer) for name, layer in layers.items()}
        for name, module in replacements.items():
            replace_module(model, name, module.train(layers[name].module.training))
        return model

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{name: module}`` of the layers of ``model`` this method built (by module type)."""
        kinds = self.layer_types()
        return {name: module for name, module in model.named_modules() if kinds and isinstance(module, kinds)}

    def layer_types(self) -> tuple[type, ...]:
        """The module classes :meth:`build` returns (what :meth:`layers` looks for)."""
        return ()

    def schedule(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int) -> Any:
        """The learning-rate schedule training should use: the bench's cosine unless a method
        needs its own (ReLoRA's jagged cosine)."""
        return cosine_schedule(optimizer, warmup_steps=warmup_steps, total_steps=total_steps)


PARAMETRISATIONS: Registry[type[Parametrisation]] = Registry("pretraining parametrisation")


def parametrisation(name: str, *, rank: int | None = None, **options: Any) -> Parametrisation:
    """The registered parametrisation ``name`` at ``rank`` with its options checked.

    The instance is also the method's training hook: pass it to
    ``rankwise.training.train(..., hooks=[method], scheduler=method.schedule(optimizer, ...))``
    for the methods that act during training (relora, sst, structured_ffn, the refactorisation
    options of the low-rank methods).
    """
    return PARAMETRISATIONS.get(name)(rank, method=name, **options)


def parametrize(
    model: nn.Module, name: str, *, rank: int | None = None, targets: Targets | None = None, **options: Any
) -> nn.Module:
    """Replace the targeted dense layers of ``model`` by parametrisation ``name``.

    ``targets`` defaults to the method's own (every Linear-like layer but the head; the FFN
    layers for ``structured_ffn``). Modifies ``model`` in place and returns it; on any error
    the model is unchanged. Methods that act during training need their hook: build them with
    :func:`parametrisation` and call ``.apply(model)`` instead.
    """
    return parametrisation(name, rank=rank, **options).apply(model, targets)


def method_options(name: str) -> dict[str, Option]:
    """The options parametrisation ``name`` declares (``rankwise pretrain --help-method``)."""
    return declared_options(PARAMETRISATIONS.get(name))


#: optimizers that train adapter layers only (their builder needs rankwise.adapt's layers)
_ADAPTER_OPTIMIZER_FAMILIES = ("adapter_optimizer",)


def optimizer_support(name: str) -> dict[str, str]:
    """``{optimizer: ""}`` for every ``rankwise.optim`` optimizer that can train a model
    parametrised by ``name`` with its default targets, ``{optimizer: reason}`` for the others.

    The projected optimizers project the 2-D weights of the Linear-like layers of the model
    (``rankwise.optim.split_parameters``); a method that leaves none in the layers it replaces
    gives them nothing to build on; train it with ``torch.optim.AdamW`` (what the bench does).
    """
    from rankwise.optim import OPTIMIZERS

    cls = PARAMETRISATIONS.get(name)
    support: dict[str, str] = {}
    for entry in OPTIMIZERS.entries():
        if entry.family in _ADAPTER_OPTIMIZER_FAMILIES:
            support[entry.name] = (
                f"{entry.name} trains the LoRA pairs of rankwise.adapt adapter layers; a model parametrised by "
                f"{name} holds none"
            )
        elif cls.zero_factor_at_init and getattr(entry.obj, "zero_weights_stay_zero", False):
            support[entry.name] = (
                f"{name} starts a factor at zero (B = 0) and {entry.name} never moves an all-zero weight; "
                "train it with another optimizer"
            )
        elif not cls.trains_linear_weights and cls.default_targets == "all-linear":
            support[entry.name] = (
                f"{name}'s trainable tensors are not weights of Linear layers (rankwise.optim builds its groups "
                f"from those); train it with torch.optim.AdamW over model.parameters()"
            )
        else:
            support[entry.name] = ""
    return support


def reset_optimizer_state(optimizer: Any, parameters: list[torch.Tensor]) -> None:
    """Forget the optimizer's state of ``parameters`` (a fresh start at their next step)."""
    if optimizer is None:
        return
    for parameter in parameters:
        optimizer.state.pop(parameter, None)


def transform_moments(
    optimizer: Any, parameter: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor | None]
) -> None:
    """Apply ``transform`` to Adam's moments of ``parameter`` in place (``exp_avg``, ``exp_avg_sq``).

    Used when a method keeps a parameter's meaning but moves or prunes its state. Moments that
    are not plain tensors of the parameter's shape (a projected optimizer's low-rank moments,
    8-bit codes) cannot be transformed entry by entry: the parameter's whole state is dropped
    instead. ``transform`` returning None also drops it.
    """
    if optimizer is None or parameter not in optimizer.state:
        return
    state = optimizer.state[parameter]
    moments = [state.get(key) for key in ("exp_avg", "exp_avg_sq") if key in state]
    plain = moments and all(
        isinstance(m, torch.Tensor) and m.is_floating_point() and m.shape == parameter.shape for m in moments
    )
    if not plain:
        optimizer.state.pop(parameter, None)
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            changed = transform(state[key])
            if changed is None:
                optimizer.state.pop(parameter, None)
                return
            state[key].copy_(changed)
