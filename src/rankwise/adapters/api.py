"""Putting adapters into a model and taking them out: adapt, merge, unmerge, unload.

``adapt`` works in phases so that a bad call leaves the model exactly as it was:

1. validate the method, options, rank, alpha, targets and data presence (pure checks);
2. collect data statistics for data-driven methods (forward / backward passes on the
   unmodified model; nothing is written to it);
3. choose per-layer ranks, build every layer (``__init__`` validates each one) and run
   ``initialize`` -- still nothing in the model has changed;
4. subtract ``base_offset()`` from base weights of ``rewrites_base`` methods, restoring the
   saved weights if anything fails;
5. swap the modules in and freeze everything but the adapter parameters (the previous
   ``requires_grad`` flags are remembered for :func:`unload`).

Step 3 times each layer's ``initialize`` (the SVD / QR / LU of data-free inits, the
decompositions of data-driven ones) into ``layer.init_seconds``; :func:`init_report` sums them.

Stacking is refused: adapting a model that already holds adapters raises a RankwiseError
(call :func:`unload` first to fold the existing adapters into the weights).
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from torch import nn

from rankwise.adapters.base import ADAPTERS, ALPHA, RANK, AdapterLayer
from rankwise.calibration import materialise_data
from rankwise.errors import RankwiseError
from rankwise.options import Option, declared_options
from rankwise.targets import Targets, match_targets, replace_module

# Attribute on the model holding {parameter name: requires_grad} from before adapt / load_adapter.
_FLAGS_ATTR = "_rankwise_requires_grad_before"


def methods() -> list[str]:
    """Names of the registered adapter methods."""
    return ADAPTERS.names()


def method_options(name: str) -> dict[str, Option]:
    """Every option adapter method ``name`` accepts (its own and its bases'), as declared."""
    return declared_options(ADAPTERS.get(name))


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """``{module name: layer}`` for every adapter layer in ``model``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def require_adapters(model: nn.Module, action: str) -> dict[str, AdapterLayer]:
    layers = adapter_layers(model)
    if not layers:
        raise RankwiseError(f"cannot {action}: the model has no adapters; call rankwise.adapt(model, ...) first")
    return layers


def refuse_adapted(model: nn.Module, action: str) -> None:
    layers = adapter_layers(model)
    if layers:
        sample = ", ".join(list(layers)[:3])
        raise RankwiseError(
            f"cannot {action}: the model already holds adapters ({sample}{' ...' if len(layers) > 3 else ''}); "
            "stacking adapters is not supported -- call rankwise.unload(model) first to merge them into the weights"
        )


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameter entries (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_layer(
    method: str,
    base: nn.Linear,
    rank: int,
    alpha: float | None,
    name: str,
    options: dict[str, Any],
    shared: dict[str, torch.Tensor] | None = None,
) -> AdapterLayer:
    """Construct (validate + allocate, no init) one layer of a registered method."""
    cls = ADAPTERS.get(method)
    layer = cls(base, rank, alpha, name=name, method=method, shared=shared, **options)
    return layer.train(base.training)  # a new module starts in train mode; follow the model's mode


def install_layers(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Swap ``layers`` into ``model`` and make exactly the adapter parameters trainable."""
    setattr(model, _FLAGS_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    for name, layer in layers.items():
        replace_module(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for key, p in layer.named_parameters():
            if not key.startswith("base."):
                p.requires_grad_(True)


def rewrite_bases(layers: Iterable[AdapterLayer]) -> None:
    """``apply_base_rewrite`` on every layer, all or nothing."""
    rewriting = [layer for layer in layers if layer.rewrites_base]
    saved = [layer.base.weight.detach().clone() for layer in rewriting]
    try:
        for layer in rewriting:
            layer.apply_base_rewrite()
    except BaseException:
        with torch.no_grad():
            for layer, weight in zip(rewriting, saved):
                layer.base.weight.copy_(weight)
        raise


def _refuse_tied_weights(model: nn.Module, bases: dict[str, nn.Linear]) -> None:
    """Merging into a weight tied to another module (lm_head <-> embeddings) would change both."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, base in bases.items():
        sharing = owners.get(id(base.weight), [])
        if len(sharing) > 1:
            raise RankwiseError(
                f"the weight of {name!r} is tied to {', '.join(n for n in sharing if n != name + '.weight')}; "
                "exclude this layer from targets (an adapter on a tied weight would also change the tied module)"
            )


def initialize_timed(layer: AdapterLayer, stats: Any) -> None:
    """``layer.initialize(stats)``, its wall-clock seconds stored in ``layer.init_seconds``."""
    start = time.perf_counter()
    layer.initialize(stats)
    if layer.base.weight.device.type == "cuda":
        torch.cuda.synchronize(layer.base.weight.device)  # kernels run asynchronously: wait for them
    layer.init_seconds = time.perf_counter() - start


def init_report(model: nn.Module) -> dict[str, Any]:
    """``{"total_seconds": float, "layers": {module name: seconds}}``: time spent in each layer's
    initialisation by :func:`adapt` (statistics collection for data-driven methods not included).
    Layers built by ``load_adapter`` were not initialised and are not listed."""
    layers = {
        name: layer.init_seconds
        for name, layer in require_adapters(model, "report init times").items()
        if layer.init_seconds is not None
    }
    return {"total_seconds": sum(layers.values()), "layers": layers}


def adapt(
    model: nn.Module,
    method: str,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = "all-linear",
    data: Iterable[Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Wrap the ``targets`` Linear layers of ``model`` (in place) with ``method`` adapters.

    ``alpha=None`` means ``alpha = rank`` (scaling 1 for LoRA). ``data`` (an iterable of
    batches: dicts for ``model(**batch)`` or tensors for ``model(batch)``) is required by
    data-driven methods and refused by the others. Returns ``model``, whose only trainable
    parameters are now the adapters'.
    """
    cls = ADAPTERS.get(method)
    options = cls.resolve_options(options, owner=method)
    RANK.check("rank", rank, method)
    alpha = ALPHA.check("alpha", alpha, method)
    alpha = float(rank) if alpha is None else alpha  # the requested rank, also where allocate_ranks varies it
    refuse_adapted(model, f"adapt with {method!r}")
    names = match_targets(model, targets, kind=nn.Linear)
    bases: dict[str, nn.Linear] = {name: model.get_submodule(name) for name in names}
    _refuse_tied_weights(model, bases)
    for name, base in bases.items():
        cls.check_rank(name, base.in_features, base.out_features, rank)
    if cls.needs_data() and data is None:
        raise RankwiseError(
            f"{method} is data-driven: pass data=[batch, ...] (batches the model accepts, "
            f"it collects {', '.join(cls.statistics)})"
        )
    if not cls.needs_data() and data is not None:
        raise RankwiseError(f"{method} does not use data; drop the data argument")

    stats = cls.collect_statistics(model, names, materialise_data(data), options) if cls.needs_data() else {}
    shared = cls.make_shared(bases, rank, options)
    ranks = cls.allocate_ranks(rank, bases, stats, options)
    layers = {
        name: build_layer(method, base, ranks[name], alpha, name, options, shared) for name, base in bases.items()
    }
    for name, layer in layers.items():
        initialize_timed(layer, stats.get(name))
    rewrite_bases(layers.values())
    install_layers(model, layers)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter's update into its base weight (``W += delta``); forward uses ``W`` only."""
    for layer in require_adapters(model, "merge").values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (``W -= delta``); the adapters run unmerged again."""
    for layer in require_adapters(model, "unmerge").values():
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Merge the updates, put the plain Linear layers back and restore ``requires_grad`` flags."""
    layers = require_adapters(model, "unload")
    for name, layer in layers.items():
        layer.merge()
        replace_module(model, name, layer.base)
    flags = getattr(model, _FLAGS_ATTR, {})
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, True))
    if hasattr(model, _FLAGS_ATTR):
        delattr(model, _FLAGS_ATTR)
    return model
