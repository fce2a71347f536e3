"""The optimizer registry and what every registered optimizer class declares.

``OPTIMIZERS`` maps a name to an optimizer *class* with its metadata::

    @OPTIMIZERS.register("galore", family="galore", paper="GaLore: ...", arxiv="2403.03507",
                         supports=("layerwise", "ddp", "fsdp2"))
    class GaLoreAdamW(LowRankAdamW): ...

Every registered class mixes in :class:`OptimizerMethod`, which declares, with defaults:

- ``HYPERPARAMETERS``: optimizer-wide options (Adam's ``lr``, ``betas``, ...; constructor
  keywords that every param group inherits), and ``OPTIONS``: the keys of the method's own
  param group (merged along the class hierarchy), both :class:`rankwise.options.Option`
  declarations; ``ALIASES`` maps accepted alternative names to declared ones.
- :meth:`OptimizerMethod.from_model` (the builder ``rankwise.optim.build`` calls; by default
  the targeted weights form group 0 and every other trainable parameter group 1, see
  :func:`split_parameters`) and :meth:`OptimizerMethod.from_parameters`.
- ``supports_layerwise`` (whether :class:`rankwise.optim.layerwise.LayerwiseOptimizer` may
  step its parameters one at a time), ``refresh_seconds`` (time spent choosing subspaces),
  ``warn_once``.

``supports`` in the registry entry lists what the test suites run each optimizer under
(``layerwise``, ``ddp``, ``fsdp2``; ``loraplus`` for the optimizers LoRA+ may regroup); it
must agree with ``supports_layerwise``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.optim.options import ADAM
from rankwise.options import Option, declared_options, refuse_unknown, resolve
from rankwise.registry import Registry
from rankwise.targets import Targets, match_targets

OPTIMIZERS: Registry[type] = Registry("optimizer")


def _adapter_matrices(model: nn.Module, base_names: set[str]) -> list[tuple[str, nn.Parameter]]:
    """Named trainable 2-D parameters of the adapter layers whose base is among ``base_names``."""
    from rankwise.adapters.base import AdapterLayer  # the optimizers do not need adapters to import

    found = []
    for layer_name, layer in model.named_modules():
        if isinstance(layer, AdapterLayer) and f"{layer_name}.base" in base_names:
            for param_name, param in layer.named_parameters():
                if param.requires_grad and param.ndim == 2 and not param_name.startswith("base."):
                    found.append((f"{layer_name}.{param_name}", param))
    return found


def split_parameters(
    model: nn.Module, targets: Targets = "all-linear"
) -> tuple[list[tuple[str, nn.Parameter]], list[nn.Parameter]]:
    """``(projected, others)``: named trainable weights of the targeted Linear layers, and the
    remaining trainable parameters (a tied / shared parameter appears once).

    On an adapted model (``rankwise.adapt``) the targeted layers' own weights are frozen and
    the trainable parameters are the adapters': the projected group then holds the 2-D
    adapter parameters of the targeted layers (LoRA's ``A`` and ``B``: a projected optimizer's
    rank is at most their smaller side, the adapter rank), the others everything else that
    trains. A quantized base layer (bitsandbytes 4-bit / 8-bit) holds no full-precision weight
    an optimizer could update: targeting only such layers of a model without adapters raises.
    """
    from rankwise.layers import is_quantized, layer_kind

    projected: list[tuple[str, nn.Parameter]] = []
    chosen: set[int] = set()
    names = match_targets(model, targets)
    quantized: dict[str, str] = {}
    for module_name in names:
        module = model.get_submodule(module_name)
        if is_quantized(module):
            quantized[module_name] = layer_kind(module)
            continue
        weight = module.weight
        if weight.requires_grad and id(weight) not in chosen:
            chosen.add(id(weight))
            projected.append((f"{module_name}.weight", weight))
    if not projected:
        for name, param in _adapter_matrices(model, set(names)):
            if id(param) not in chosen:
                chosen.add(id(param))
                projected.append((name, param))
    trained_quantized = [n for n, m in model.named_modules() if is_quantized(m) and m.weight.requires_grad]
    if trained_quantized:
        raise RankwiseError(
            f"{trained_quantized[0]} (and {len(trained_quantized) - 1} more) are quantized layers whose weight is "
            "marked trainable; an optimizer cannot update quantized weights -- freeze them "
            "(requires_grad_(False)) and train adapters on them (QLoRA)"
        )
    if not projected and quantized:
        kinds = ", ".join(sorted(set(quantized.values())))
        raise RankwiseError(
            f"targets {targets!r} matched {len(quantized)} quantized layers ({kinds}) and nothing trainable: an "
            "optimizer updates full-precision weights, which a quantized base does not have. Put adapters on it "
            "(rankwise.adapt, QLoRA) and optimize those, or load the model unquantized"
        )
    if not projected:
        raise RankwiseError(
            f"targets {targets!r} matched only frozen Linear layers; unfreeze them or choose other targets"
        )
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return projected, others


class OptimizerMethod:
    """Mixin of every registered optimizer class (before its ``torch.optim.Optimizer`` base)."""

    HYPERPARAMETERS: ClassVar[dict[str, Option]] = ADAM
    OPTIONS: ClassVar[dict[str, Option]] = {}
    ALIASES: ClassVar[dict[str, str]] = {}
    supports_layerwise: ClassVar[bool] = True
    refresh_seconds: float = 0.0  # cumulative wall time of subspace refreshes (an instance attribute once set)

    # ---- declarations

    @classmethod
    def group_options(cls) -> dict[str, Option]:
        """The keys of the method's own param group (``OPTIONS`` along the class hierarchy)."""
        return declared_options(cls)

    @classmethod
    def method_options(cls) -> dict[str, Option]:
        """Every keyword ``build`` accepts for this method besides ``lr``'s required value: the
        optimizer-wide hyperparameters and the group keys."""
        return {**cls.HYPERPARAMETERS, **cls.group_options()}

    @classmethod
    def resolve_aliases(cls, keys: Mapping[str, Any]) -> dict[str, Any]:
        """``keys`` with alternative names (``ALIASES``) renamed; both names given differently raise."""
        keys = dict(keys)
        for alias, name in cls.ALIASES.items():
            if alias in keys:
                if name in keys and keys[name] != keys[alias]:
                    raise RankwiseError(
                        f"{cls.__name__} got both {name}={keys[name]!r} and {alias}={keys[alias]!r}; "
                        f"they are the same setting ({alias} is another name for {name}): pass one"
                    )
                keys[name] = keys.pop(alias)
        return keys

    # ---- construction

    @classmethod
    def from_model(cls, model: nn.Module, *, lr: float, targets: Targets = "all-linear", **hparams: Any) -> Any:
        """The optimizer over ``model`` (what ``rankwise.optim.build`` calls): group 0 = the
        targeted Linear weights, group 1 = the other trainable parameters."""
        projected, others = split_parameters(model, targets)
        return cls.from_parameters(projected, others, lr=lr, **hparams)

    @classmethod
    def from_parameters(
        cls, projected: Sequence[tuple[str, torch.Tensor]], others: Sequence[torch.Tensor], *, lr: float,
        **hparams: Any,
    ) -> Any:
        """Group 0 = ``projected`` with every group key (``hparams``' values, else the declared
        defaults), group 1 = ``others``; the optimizer-wide hyperparameters in ``hparams`` apply
        to both. Unknown names or bad values raise before anything is built."""
        hparams = cls.resolve_aliases(hparams)
        refuse_unknown(cls.method_options(), hparams, owner=cls.__name__)
        group_keys = cls.group_options()
        method = resolve(group_keys, {k: v for k, v in hparams.items() if k in group_keys}, owner=cls.__name__)
        hyper = {k: v for k, v in hparams.items() if k not in group_keys}
        groups: list[dict] = [{"params": [p for _, p in projected], **method}]
        if others:
            groups.append({"params": list(others)})
        hyper = resolve(cls.HYPERPARAMETERS, {"lr": lr, **hyper}, owner=cls.__name__)
        return cls.construct(groups, hyper, {id(p): name for name, p in projected})

    @classmethod
    def construct(cls, groups: list[dict], hyperparameters: dict[str, Any], names: Mapping[int, str]) -> Any:
        """``cls(groups, **hyperparameters)``; methods that name parameters in errors take ``names``."""
        return cls(groups, **hyperparameters)

    # ---- stepping

    @staticmethod
    def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
        """The loss of ``step(closure)``: the closure evaluated with gradients enabled, or None."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # ---- reporting

    def warn_once(self, kind: str, message: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if kind not in warned:
            warned.add(kind)
            warnings.warn(f"{type(self).__name__}: {message}", RuntimeWarning, stacklevel=3)


def method_options(name: str) -> dict[str, Option]:
    """Every option of the registered optimizer ``name`` (hyperparameters and group keys), for
    ``--help-method`` / ``--method-args``; RankwiseError listing the known names otherwise."""
    return OPTIMIZERS.get(name).method_options()
