"""Putting adapters into a model and taking them out: adapt, merge, unmerge, unload.

``adapt`` works in phases so that a bad call leaves the model exactly as it was:

1. validate the method, options, rank, alpha, adapter name, targets (their layer kinds against
   the registration's ``supports``) and data presence (pure checks);
2. collect data statistics for data-driven methods (forward / backward passes on the base
   model -- every adapter already in it switched off -- nothing is written to it);
3. choose per-layer ranks, build every layer (``__init__`` validates each one) and run
   ``initialize`` -- still nothing in the model has changed;
4. subtract ``base_offset()`` from base weights of ``rewrites_base`` methods, restoring the
   saved weights if anything fails;
5. swap the modules in, make the new adapter the active one and freeze everything but its
   parameters (the ``requires_grad`` flags from before the first adapter are remembered for
   :func:`unload`).

Step 3 times each layer's ``initialize`` (the SVD / QR / LU of data-free inits, the
decompositions of data-driven ones) into ``layer.init_seconds`` -- work shared by the layers
(``prepare_initialization``: one batched SVD per shape) is split evenly among them -- and,
for inits that rewrite the base, records the relative residual ``||W - offset||_F / ||W||_F``
in ``layer.init_residual``; :func:`init_report` reports both.

Named adapters: every adapter has a name (``adapter_name="default"``). Adapting again with a
NEW name adds a second adapter (same or another method, same or other modules); a module
holding several becomes an :class:`~rankwise.adapters.base.AdapterSet`. Exactly one adapter is
active: the one added last, or the one :func:`rankwise.adapters.set_adapter` chose. Every
function that acts on "the adapters" (merge, unmerge, unload, save_adapter, export_peft, the
training hooks, LoRA+ / LoRA-Pro) acts on the active one; an inactive adapter that rewrote the
base adds its offset back in the forward, so the others see the original weight. The same name
twice is refused.
"""

from __future__ import annotations

import abc
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from rankwise.adapters.base import (
    ADAPTERS,
    ALPHA,
    RANK,
    AdapterLayer,
    AdapterSet,
    check_adapter_name,
    standalone,
    supported_kind_check,
)
from rankwise.calibration import materialise_data
from rankwise.errors import RankwiseError
from rankwise.layers import ADAPTABLE_KINDS, LINEAR_KINDS, Conv1D, disable_cpu_repacking, features, layer_kind
from rankwise.options import Option, declared_options
from rankwise.targets import Targets, match_targets, replace_module

# Attribute on the model holding {parameter name: requires_grad} from before the first adapter.
_FLAGS_ATTR = "_rankwise_requires_grad_before"
# Attribute on the model holding the name of the active adapter.
_ACTIVE_ATTR = "_rankwise_active_adapter"

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def methods() -> list[str]:
    """Names of the registered adapter methods."""
    return ADAPTERS.names()


def method_options(name: str) -> dict[str, Option]:
    """Every option adapter method ``name`` accepts (its own and its bases'), as declared."""
    return declared_options(ADAPTERS.get(name))


# ----- where the adapters are ------------------------------------------------------------------


def adapted_modules(model: nn.Module) -> dict[str, AdapterLayer | AdapterSet]:
    """``{module name: wrapper}``: every module holding one adapter (an AdapterLayer) or several (an AdapterSet)."""
    found: dict[str, AdapterLayer | AdapterSet] = {}
    for name, module in model.named_modules():
        if isinstance(module, (AdapterLayer, AdapterSet)) and not any(name.startswith(f"{n}.") for n in found):
            found[name] = module
    return found


def layers_of(wrapper: AdapterLayer | AdapterSet) -> dict[str, AdapterLayer]:
    """``{adapter name: layer}`` held by one wrapper."""
    if isinstance(wrapper, AdapterSet):
        return dict(wrapper.adapters.items())
    return {wrapper.adapter_name: wrapper}


def all_adapters(model: nn.Module) -> dict[str, dict[str, AdapterLayer]]:
    """``{adapter name: {module name: layer}}`` in the order the names first appear."""
    by_name: dict[str, dict[str, AdapterLayer]] = {}
    for module_name, wrapper in adapted_modules(model).items():
        for adapter_name, layer in layers_of(wrapper).items():
            by_name.setdefault(adapter_name, {})[module_name] = layer
    return by_name


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``."""
    return list(all_adapters(model))


def active_adapter(model: nn.Module) -> str | None:
    """Name of the active adapter (None when the model has none)."""
    names = adapter_names(model)
    active = getattr(model, _ACTIVE_ATTR, None)
    return active if active in names else (names[-1] if names else None)


def adapter_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, AdapterLayer]:
    """``{module name: layer}`` of adapter ``adapter_name`` (default: the active adapter)."""
    name = adapter_name if adapter_name is not None else active_adapter(model)
    return all_adapters(model).get(name, {}) if name is not None else {}


def require_adapters(model: nn.Module, action: str, adapter_name: str | None = None) -> dict[str, AdapterLayer]:
    """The layers of ``adapter_name`` (default the active adapter); a clear error when there are none."""
    names = adapter_names(model)
    if not names:
        raise RankwiseError(f"cannot {action}: the model has no adapters; call rankwise.adapt(model, ...) first")
    if adapter_name is not None and adapter_name not in names:
        raise RankwiseError(
            f"cannot {action}: the model has no adapter named {adapter_name!r}; its adapters: {', '.join(names)}"
        )
    return adapter_layers(model, adapter_name)


def refuse_existing_name(model: nn.Module, adapter_name: str, action: str) -> None:
    names = adapter_names(model)
    if adapter_name in names:
        raise RankwiseError(
            f"cannot {action}: the model already holds an adapter named {adapter_name!r} (adapters: "
            f"{', '.join(names)}); pass another adapter_name=... to add one beside it, or call "
            f"rankwise.adapters.delete_adapter(model, {adapter_name!r}) (or rankwise.unload(model)) first"
        )


def refuse_merged(model: nn.Module, action: str) -> None:
    merged = [f"{n} ({layer.adapter_name})" for n, w in adapted_modules(model).items()
              for layer in layers_of(w).values() if layer.merged]
    if merged:
        raise RankwiseError(
            f"cannot {action} while an adapter is merged into the base weights ({', '.join(merged[:3])}); "
            "call rankwise.unmerge(model) first"
        )


def refuse_adapted(model: nn.Module, action: str, adapter_name: str = "default") -> None:
    """Refuse adding adapter ``adapter_name`` when that name exists or an adapter is merged."""
    refuse_existing_name(model, adapter_name, action)
    refuse_merged(model, action)


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable parameter entries (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----- choosing and building -------------------------------------------------------------------


class AdaptableLayer(abc.ABC):
    """``isinstance(module, AdaptableLayer)``: a layer some adapter can wrap (Linear-like, Embedding,
    Conv2d), or a module already holding adapters -- the candidates of ``targets``."""

    @classmethod
    def __subclasshook__(cls, candidate: type) -> bool:
        return issubclass(candidate, (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d, AdapterLayer, AdapterSet))


def base_of(module: nn.Module) -> nn.Module:
    """The wrapped layer of an adapter wrapper, else the module itself."""
    return module.base if isinstance(module, (AdapterLayer, AdapterSet)) else module


def match_adaptable(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the modules ``targets`` selects among the adaptable ones (a module holding adapters
    counts under its own name). ``"all-linear"`` keeps the Linear-like ones, as in PEFT."""
    wrappers = adapted_modules(model)
    names = match_targets(model, targets, kind=AdaptableLayer)
    chosen = [n for n in names if not any(n.startswith(f"{w}.") for w in wrappers)]
    if isinstance(targets, str) and targets == "all-linear":
        chosen = [n for n in chosen if layer_kind(base_of(model.get_submodule(n))) in LINEAR_KINDS]
    chosen = [n for n in chosen if layer_kind(base_of(model.get_submodule(n))) in ADAPTABLE_KINDS]
    if not chosen:
        raise RankwiseError(f"targets {targets!r} matched no adaptable layer (only modules inside adapters); "
                            "name the adapted modules themselves, e.g. 'q_proj'")
    return chosen


def build_layer(
    method: str,
    base: nn.Module,
    rank: int,
    alpha: float | None,
    name: str,
    options: dict[str, Any],
    shared: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> AdapterLayer:
    """Construct (validate + allocate, no init) one layer of a registered method."""
    cls = ADAPTERS.get(method)
    layer = cls(base, rank, alpha, name=name, method=method, shared=shared, **options)
    layer.adapter_name = adapter_name
    return layer.train(base.training)  # a new module starts in train mode; follow the model's mode


def check_supported(method: str, bases: dict[str, nn.Module]) -> None:
    """Every base is of a kind the method's registration lists (before anything is built)."""
    supports = ADAPTERS.entry(method).supports
    for name, base in bases.items():
        supported_kind_check(method, supports, name, base)


def existing_layers(model: nn.Module, name: str) -> tuple[AdapterLayer, ...]:
    """The adapters already on module ``name`` (empty when it holds none)."""
    module = model.get_submodule(name)
    return tuple(layers_of(module).values()) if isinstance(module, (AdapterLayer, AdapterSet)) else ()


@contextmanager
def all_inactive(model: nn.Module) -> Iterator[None]:
    """Every adapter switched off (the base model's outputs) inside the block; flags restored after."""
    layers = [layer for w in adapted_modules(model).values() for layer in layers_of(w).values()]
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer.enabled = flag


def activate(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter: only its layers contribute their update and train."""
    for wrapper in adapted_modules(model).values():
        for name, layer in layers_of(wrapper).items():
            layer.enabled = name == adapter_name
            for key, p in layer.named_parameters():
                if not key.startswith("base."):
                    p.requires_grad_(name == adapter_name)
    setattr(model, _ACTIVE_ATTR, adapter_name)


def install_layers(model: nn.Module, layers: dict[str, AdapterLayer], adapter_name: str = "default") -> None:
    """Swap ``layers`` into ``model`` (joining adapters already there) and make exactly the new
    adapter's parameters trainable."""
    if not adapted_modules(model):
        setattr(model, _FLAGS_ATTR, {n: p.requires_grad for n, p in model.named_parameters()})
    for name, layer in layers.items():
        layer.adapter_name = adapter_name
        disable_cpu_repacking(layer.base)  # adapters switch between train and eval: see rankwise.layers
        current = model.get_submodule(name)
        if isinstance(current, AdapterSet):
            current.add(adapter_name, layer)
        elif isinstance(current, AdapterLayer):
            replace_module(model, name, AdapterSet(current.base, {current.adapter_name: current, adapter_name: layer}))
        else:
            replace_module(model, name, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    activate(model, adapter_name)


def rewrite_bases(layers: Iterable[AdapterLayer]) -> None:
    """``apply_base_rewrite`` on every layer, all or nothing."""
    rewriting = [layer for layer in layers if layer.rewrites_base or layer.replaces_base]
    saved = [(layer.base, layer.base.weight.detach().clone()) for layer in rewriting]
    try:
        for layer in rewriting:
            layer.apply_base_rewrite()
    except BaseException:
        with torch.no_grad():
            for layer, (base, weight) in zip(rewriting, saved):
                base.weight.copy_(weight)
                if layer.base is not base:
                    layer.base = base
        raise


def _refuse_tied_weights(model: nn.Module, bases: dict[str, nn.Module]) -> None:
    """Merging into a weight tied to another module (lm_head <-> embeddings) would change both."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, base in bases.items():
        sharing = owners.get(id(base.weight), [])
        if len(sharing) > 1:
            raise RankwiseError(
                f"the weight of {name!r} is tied to {', '.join(n for n in sharing if not n.startswith(name + '.'))}; "
                "exclude this layer from targets (an adapter on a tied weight would also change the tied module "
                "when merged, e.g. GPT-2's lm_head and its token embedding)"
            )


def _synchronize(layer: AdapterLayer) -> None:
    device = layer.factory["device"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them


def initialize_timed(layer: AdapterLayer, stats: Any, shared_seconds: float = 0.0) -> None:
    """``layer.initialize(stats)``, its wall-clock seconds (plus its share ``shared_seconds`` of
    the batched preparation) stored in ``layer.init_seconds``; for a base-rewriting init also
    ``layer.init_residual = ||W - base_offset()||_F / ||W||_F`` (not timed)."""
    start = time.perf_counter()
    layer.initialize(stats)
    _synchronize(layer)
    layer.init_seconds = time.perf_counter() - start + shared_seconds
    if layer.rewrites_base:
        with torch.no_grad():
            weight = layer.base_weight()
            residual = torch.linalg.matrix_norm(weight - layer.base_offset().to(weight.device))
            layer.init_residual = (residual / torch.linalg.matrix_norm(weight).clamp_min(1e-30)).item()


def init_report(model: nn.Module) -> dict[str, Any]:
    """``{"total_seconds": float, "layers": {module name: seconds}, "residual_error": {module
    name: ||W - offset||_F / ||W||_F}}``: time spent in each layer's initialisation by
    :func:`adapt` (statistics collection for data-driven methods not included) and, for inits
    that move part of ``W`` into the adapter (PiSSA, OLoRA, CorDA, SVFit, ...), the relative
    Frobenius norm of what stayed in the base (for PiSSA's exact SVD ``sqrt(sum_{i>r}
    s_i^2) / ||W||_F``, the least any rank-r split leaves; a randomized SVD leaves more).
    Layers built by ``load_adapter`` were not initialised and are not listed."""
    adapters = require_adapters(model, "report init times")
    layers = {name: layer.init_seconds for name, layer in adapters.items() if layer.init_seconds is not None}
    residuals = {name: layer.init_residual for name, layer in adapters.items() if layer.init_residual is not None}
    return {"total_seconds": sum(layers.values()), "layers": layers, "residual_error": residuals}


def adapt(
    model: nn.Module,
    method: str,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Targets = "all-linear",
    data: Iterable[Any] | None = None,
    adapter_name: str = "default",
    loss_fn: LossFn | None = None,
    **options: Any,
) -> nn.Module:
    """Wrap the ``targets`` layers of ``model`` (in place) with ``method`` adapters named ``adapter_name``.

    Targets may be any layer kind the method's registration ``supports`` (Linear, GPT-2's Conv1D,
    bitsandbytes 4-bit / 8-bit Linear, and for some methods Embedding / Conv2d); ``"all-linear"``
    means every Linear-like layer but the output head. ``alpha=None`` means ``alpha = rank``
    (scaling 1 for LoRA). ``data`` (an iterable of batches: dicts for ``model(**batch)`` or tensors
    for ``model(batch)``) is required by data-driven methods and refused by the others;
    ``loss_fn(model, batch) -> scalar`` is the loss of gradient-based inits for models that
    compute none themselves (encoders, custom heads). On a model that already holds adapters, a
    new ``adapter_name`` adds one beside them (statistics are collected on the base model) and
    makes it the active one. Returns ``model``, whose only trainable parameters are now the new
    adapter's.
    """
    cls = ADAPTERS.get(method)
    options = cls.resolve_options(options, owner=method)
    RANK.check("rank", rank, method)
    alpha = ALPHA.check("alpha", alpha, method)
    alpha = float(rank) if alpha is None else alpha  # the requested rank, also where allocate_ranks varies it
    check_adapter_name(adapter_name)
    refuse_adapted(model, f"adapt with {method!r}", adapter_name)
    names = match_adaptable(model, targets)
    bases = {name: base_of(model.get_submodule(name)) for name in names}
    check_supported(method, bases)
    _refuse_tied_weights(model, bases)
    for name, base in bases.items():
        cls.check_rank(name, *reversed(features(base)), rank)
    if cls.needs_data() and data is None:
        raise RankwiseError(
            f"{method} is data-driven: pass data=[batch, ...] (batches the model accepts, "
            f"it collects {', '.join(cls.statistics)})"
        )
    if not cls.needs_data() and (data is not None or loss_fn is not None):
        raise RankwiseError(f"{method} does not use data; drop the data / loss_fn arguments")
    if loss_fn is not None and not callable(loss_fn):
        raise RankwiseError(f"loss_fn must be a function (model, batch) -> scalar loss, got {type(loss_fn).__name__}")

    with all_inactive(model):  # statistics and rank allocation see the base model
        stats = (cls.collect_statistics(model, names, materialise_data(data), options, loss_fn=loss_fn)
                 if cls.needs_data() else {})
        shared = cls.make_shared(bases, rank, options)
        ranks = cls.allocate_ranks(rank, bases, stats, options)
    layers = {
        name: build_layer(method, base, ranks[name], alpha, name, options, shared, adapter_name)
        for name, base in bases.items()
    }
    for name, layer in layers.items():
        layer.siblings = existing_layers(model, name)  # its init sees the weight the other adapters restore
    start = time.perf_counter()
    cls.prepare_initialization(layers, stats)
    for layer in layers.values():
        _synchronize(layer)
    shared_seconds = (time.perf_counter() - start) / max(len(layers), 1)
    for name, layer in layers.items():
        initialize_timed(layer, stats.get(name), shared_seconds)
    rewrite_bases(layers.values())
    install_layers(model, layers, adapter_name)
    return model


def _check_lossy(layers: Iterable[AdapterLayer], action: str, allow_lossy: bool) -> None:
    for layer in layers:
        layer.refuse_lossy(action, allow_lossy)


def merge(model: nn.Module, *, allow_lossy: bool = False) -> nn.Module:
    """Fold the active adapter's update into its base weights (``W += delta``); forward uses ``W`` only.

    Into a quantized (bitsandbytes) base this dequantizes, adds and quantizes again, which is
    lossy: refused unless ``allow_lossy=True`` (checked for every layer before any is merged)."""
    layers = require_adapters(model, "merge")
    _check_lossy([layer for layer in layers.values() if not layer.merged], "merge", allow_lossy)
    for layer in layers.values():
        layer.merge(allow_lossy=allow_lossy)
    return model


def unmerge(model: nn.Module, *, allow_lossy: bool = False) -> nn.Module:
    """Undo :func:`merge` (``W -= delta``); the adapters run unmerged again (lossy on quantized bases)."""
    layers = require_adapters(model, "unmerge")
    _check_lossy([layer for layer in layers.values() if layer.merged], "unmerge", allow_lossy)
    for layer in layers.values():
        layer.unmerge(allow_lossy=allow_lossy)
    return model


def restore_flags(model: nn.Module) -> None:
    """The ``requires_grad`` flags from before the first adapter, once the model holds none."""
    flags = getattr(model, _FLAGS_ATTR, {})
    for name, p in model.named_parameters():
        if p.is_floating_point():  # a quantized base's codes (LoftQ's) never require grad
            p.requires_grad_(flags.get(name, True))
    for attr in (_FLAGS_ATTR, _ACTIVE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)


def unload(model: nn.Module, *, allow_lossy: bool = False) -> nn.Module:
    """Merge the active adapter's updates, drop every adapter (undoing the base rewrites of the
    others), put the plain layers back and restore the ``requires_grad`` flags.

    On a quantized base the merge is lossy and needs ``allow_lossy=True`` (checked first)."""
    require_adapters(model, "unload")
    active = active_adapter(model)
    wrappers = adapted_modules(model)
    to_write = [layer for w in wrappers.values() for name, layer in layers_of(w).items()
                if (name == active and not layer.merged) or (name != active and layer.rewrites_base)]
    _check_lossy(to_write, "unload", allow_lossy)
    for module_name, wrapper in wrappers.items():
        for name, layer in layers_of(wrapper).items():
            if name == active:
                layer.merge(allow_lossy=allow_lossy)
            else:
                layer.undo_base_rewrite()
        replace_module(model, module_name, wrapper.base)
    restore_flags(model)
    return model


def remove_adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, AdapterLayer]:
    """Take adapter ``adapter_name``'s layers out of ``model`` (no weight is written); a module left
    with one adapter holds it alone again, a module left with none gets its base back."""
    removed = {}
    for module_name, wrapper in adapted_modules(model).items():
        if isinstance(wrapper, AdapterSet) and adapter_name in wrapper.adapters:
            removed[module_name] = wrapper.remove(adapter_name)
            if len(wrapper.adapters) == 1:
                replace_module(model, module_name, standalone(next(iter(wrapper.adapters.values()))))
        elif isinstance(wrapper, AdapterLayer) and wrapper.adapter_name == adapter_name:
            removed[module_name] = wrapper
            replace_module(model, module_name, wrapper.base)
    for layer in removed.values():
        standalone(layer)
    return removed
