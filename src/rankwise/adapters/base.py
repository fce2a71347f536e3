"""The adapter layer contract: one nn.Linear wrapped with a low-rank (or otherwise cheap) update.

How to add an adapter method
============================

One file, one registration, one test row; nothing else changes.

1. Create ``src/rankwise/adapters/<method>.py`` (``adapters/__init__.py`` imports every module
   of the package, which runs the registration) with one subclass of :class:`AdapterLayer`
   -- or of a family class it shares with other methods: :mod:`~rankwise.adapters.lora_family`
   (trainable ``lora_A`` / ``lora_B`` with a scaling), :mod:`~rankwise.adapters.rewrite`
   (inits that move part of ``W`` out of the base), :mod:`~rankwise.adapters.svd_triplet_family`
   (``P diag(lambda) Q`` updates), :mod:`~rankwise.adapters.gradient_family` (inits from the
   SVD of the full-weight gradient). A method module never imports another method module:
   move what two methods share into a family module. The module docstring cites the paper
   (title + arXiv id), gives the formula the code implements and says where it deviates.
   Register it with ONE decorator::

       @ADAPTERS.register("<method>", family="<family>", paper="<title>", arxiv="<id>",
                          supports=("linear",))

   (``needs_data`` is derived from the class's ``statistics``; passing a value that disagrees
   is a declaration error.)
2. Hooks to implement (the base class does the rest: forward, dropout, merge/unmerge in
   fp32, freezing, config, save/load, rollback):

   ``OPTIONS = {"name": Option(default, kind, help=..., low=..., choices=...), ...}``
       The method's own keyword options, declared once as :class:`rankwise.options.Option`
       (shared ones, e.g. ``niter``, from :mod:`rankwise.common_options`). They merge with the
       bases' declarations along the MRO (``dropout`` is declared here for every method) and
       are checked once, here, before any layer is built: ``adapt(..., **options)`` rejects
       unknown names (listing the accepted ones) and values of the wrong kind or range.
       ``rankwise.adapters.method_options(name)`` and ``--help-method`` read the same
       declarations. Values are JSON-serialisable: they are saved in ``adapter_config.json``.
   ``__init__(self, base, rank, alpha, **options)``
       Call ``super().__init__(base, rank, alpha, **options)`` first (checks rank against
       ``max_rank``, alpha and every option; sets ``self.rank``, ``self.alpha``,
       ``self.options``, ``self.in_features``, ``self.out_features``, ``self.name``,
       ``self.dropout``), then check what one Option cannot express (constraints between
       options, e.g. ``target_r <= rank``; raise ``self.error(...)``) and ALLOCATE tensors
       with ``self.factory`` (device/dtype of the base weight), e.g. ``torch.empty(r, n,
       **self.factory)``. Do no expensive or random init here: ``load_adapter`` builds
       layers through ``__init__`` only and then copies the saved tensors in.
       Trainable tensors are ``nn.Parameter``; frozen ones (random projections, initial
       factors) are buffers (``register_buffer``, persistent so they are saved). Everything
       outside ``self.base`` is adapter state.
   ``initialize(self, stats)``
       Fill the tensors. ``stats`` is None for data-free methods, else a
       :class:`~rankwise.calibration.LayerStatistics`. Never write to ``self.base`` here;
       see ``rewrites_base``.
   ``delta_weight(self) -> Tensor``
       The update in weight space (``out x in``), so that the layer computes
       ``base(x) + x @ delta_weight().T``.
   ``adapter_forward(self, x)`` (optional)
       The efficient unmerged path; default ``x @ delta_weight().T``.
   ``max_rank(in_features, out_features)`` (classmethod, optional)
       Largest allowed rank; default ``min(in, out)``.
   ``statistics = ("input_covariance" | "input_batches" | "weight_gradient", ...)``
       For data-driven methods: what to collect from ``adapt(..., data=...)``; this makes
       ``needs_data()`` (and the registry entry's ``needs_data``) True. Override the
       classmethod ``collect_statistics`` for anything else.
   ``rewrites_base = True`` + ``base_offset(self) -> Tensor``
       For PiSSA/OLoRA/CorDA-style inits: ``base_offset()`` returns the part moved out of
       the base (``out x in``, computed from buffers holding the initial factors). The
       framework subtracts it from the base weight after ``initialize`` and again after
       ``load_adapter`` (so a fresh base becomes the residual), and ``original_weight()``
       gives back ``W0`` for exports against the original weight.
   ``allocate_ranks(rank, bases, stats, options)`` / ``make_shared(bases, rank, options)``
       (classmethods, optional) Per-layer ranks chosen from the statistics (EVA, dynamic-rank
       methods; the saved config is per module), and tensors shared by all layers of one
       ``adapt`` call (VeRA-style random matrices, handed to every ``__init__`` as
       ``self.shared``; register the same tensor object in every layer -- the file stores it
       once and load re-ties it; at load time it is called again with the largest saved
       rank, so shapes must depend only on that).

   Optional hooks, declared here with no-op defaults (override only what the method has):
   ``regularization()`` (a loss term, summed by ``regularization_loss``), the classmethod
   ``after_step(layers, *, step, total_steps, optimizer)`` (a schedule run after each
   optimizer step), ``effective_rank()`` (ranks still in use), ``training_optimizer`` (the
   ``rankwise.optim`` name of the optimizer the paper trains the method with),
   ``lora_parameters()`` (trainable ``A``, ``B``, scaling of a LoRA-shaped update, for LoRA+,
   LoRA-Pro and PEFT export), ``lora_factors()`` / ``base_offset_factors()`` (exact factors
   of the update / the base offset, for an exact PEFT export). ``self.error(msg)`` builds a
   RankwiseError naming the method and layer. Stacking adapters is refused by ``adapt``.
3. Tests: add ONE row to ``CASES`` in the family's ``tests/cases/adapters_<family>.py``:
   ``AdapterCase("<id>", "<method>", {options}, needs_data, identity_at_init,
   lambda n_in, n_out, r: <trainable parameters of one layer>)``. The common suite fails for
   a registered method without a row. It runs every row on the tiny LLaMA at rank 4 with
   ``alpha = 2 * rank`` over all linear layers (data-driven rows get two batches with
   labels) and checks: output equal to the base at init (or different, if not promised),
   gradients on exactly the adapter parameters, the parameter count, a lower loss after 5
   Adam steps with frozen tensors unchanged, merge / unmerge / unload equality,
   ``original_weight()``, a save/load roundtrip onto a fresh base and (with PEFT installed)
   an export that PEFT loads onto the original base. Put method-specific checks (paper
   formulas on constructed inputs, the authors' code or PEFT as an oracle) in
   ``tests/test_adapters_<family or method>.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.options import Option, declared_options, resolve
from rankwise.registry import Registry

#: Layer types an adapter can wrap, by the name registrations list in ``supports``.
LAYER_TYPES: dict[str, type[nn.Module]] = {"linear": nn.Linear}

RANK = Option(8, int, low=1, help="rank r of the update (at most the method's max_rank of each layer)")
ALPHA = Option(
    None, float, low=0, low_open=True, nullable=True, help="scaling numerator (LoRA: s = alpha / r); None = rank"
)
DROPOUT = Option(
    0.0, float, low=0, high=1, high_open=True, help="dropout on the adapter path's input (not the base path)"
)


class AdapterRegistry(Registry):
    """The adapter registry: ``needs_data`` is read from the class, ``supports`` names layer types."""

    def register(  # type: ignore[override]
        self,
        name: str,
        *,
        family: str,
        paper: str,
        arxiv: str = "",
        supports: tuple[str, ...],
        needs_data: bool | None = None,
    ) -> Callable[[type[AdapterLayer]], type[AdapterLayer]]:
        unknown = sorted(set(supports) - set(LAYER_TYPES)) if supports else ["(none given)"]
        if unknown:
            raise RuntimeError(f"adapter {name!r} supports unknown layer types {unknown}; known: {sorted(LAYER_TYPES)}")

        def decorator(cls: type[AdapterLayer]) -> type[AdapterLayer]:
            derived = cls.needs_data()
            if needs_data is not None and needs_data != derived:
                raise RuntimeError(
                    f"adapter {name!r} is registered with needs_data={needs_data} but its class "
                    f"{'collects' if derived else 'collects no'} statistics; drop needs_data (it is derived)"
                )
            return Registry.register(
                self, name, family=family, paper=paper, arxiv=arxiv, needs_data=derived, supports=supports
            )(cls)

        return decorator


ADAPTERS: AdapterRegistry = AdapterRegistry("adapter method")


@dataclass(frozen=True)
class LoraParameters:
    """The trainable factors of a LoRA-shaped layer: its update is ``scaling * B @ A``.

    ``A`` (r x in) and ``B`` (out x r) are the layer's own ``nn.Parameter`` objects (not
    copies), so optimizers can group or step them: LoRA+ gives ``B`` its own learning rate,
    LoRA-Pro adjusts the pair's gradients, and ``export_peft`` writes them as PEFT's
    ``lora_A`` / ``lora_B``. ``rslora``: the scaling is ``alpha / sqrt(r)`` (PEFT's
    ``use_rslora``) rather than ``alpha / r``.
    """

    A: nn.Parameter
    B: nn.Parameter
    scaling: float
    rslora: bool = False


class AdapterLayer(nn.Module):
    """``y = base(x) + adapter_forward(dropout(x))``; after :meth:`merge`, ``y = base'(x)``
    with ``W' = W + delta_weight()``.

    Subclasses implement ``__init__`` (cross-option checks + allocate), :meth:`initialize`,
    :meth:`delta_weight` and optionally :meth:`adapter_forward`; see the module docstring.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {"dropout": DROPOUT}
    statistics: ClassVar[tuple[str, ...]] = ()
    rewrites_base: ClassVar[bool] = False
    #: the ``rankwise.optim`` name of the optimizer the method's paper trains it with (LoRA-Pro);
    #: None: any optimizer (the bench then uses AdamW)
    training_optimizer: ClassVar[str | None] = None
    #: seconds ``adapt`` spent in this layer's :meth:`initialize` (None: built by ``load_adapter``)
    init_seconds: float | None = None

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None,
        *,
        name: str = "",
        method: str = "",
        shared: dict[str, torch.Tensor] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.name = name or "<layer>"
        self.method = method or type(self).__name__
        if not isinstance(base, nn.Linear):
            raise self.error(f"can only wrap nn.Linear, got {type(base).__name__}")
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.check_rank(self.name, self.in_features, self.out_features, rank)
        self.rank = int(rank)
        alpha = ALPHA.check("alpha", alpha, self.owner)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.options = self.resolve_options(options, owner=self.owner)
        self.shared = shared or {}
        dropout = self.options["dropout"]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    # ----- class-level contract ------------------------------------------------------------

    @classmethod
    def resolve_options(cls, options: dict[str, Any], *, owner: str) -> dict[str, Any]:
        """Defaults overridden by ``options``, each value checked against its declaration."""
        return resolve(declared_options(cls), options, owner=owner)

    @classmethod
    def needs_data(cls) -> bool:
        return bool(cls.statistics)

    @classmethod
    def max_rank(cls, in_features: int, out_features: int) -> int:
        return min(in_features, out_features)

    @classmethod
    def check_rank(cls, name: str, in_features: int, out_features: int, rank: Any) -> None:
        RANK.check("rank", rank, f"layer {name!r}")
        top = cls.max_rank(in_features, out_features)
        if rank > top:
            raise RankwiseError(
                f"rank {rank!r} is out of range for layer {name!r} ({out_features} x {in_features}): "
                f"choose an integer in [1, {top}] or exclude this layer from targets"
            )

    @classmethod
    def collect_statistics(cls, model: nn.Module, names: list[str], data: list[Any], options: dict[str, Any]) -> dict:
        """Per-layer statistics for a data-driven init (default: the kinds in ``statistics``)."""
        from rankwise.calibration import collect_statistics

        return collect_statistics(model, names, data, cls.statistics)

    @classmethod
    def allocate_ranks(
        cls, rank: int, bases: dict[str, nn.Linear], stats: dict, options: dict[str, Any]
    ) -> dict[str, int]:
        """Rank of each layer; default the same ``rank`` everywhere."""
        return {name: rank for name in bases}

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Linear], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Tensors shared by all layers of one ``adapt`` call (default none)."""
        return {}

    @classmethod
    def after_step(
        cls, layers: dict[str, AdapterLayer], *, step: int, total_steps: int, optimizer: Any = None
    ) -> None:
        """The method's schedule after each optimizer step, with all of its layers (default none)."""

    # ----- per-layer hooks -----------------------------------------------------------------

    @property
    def owner(self) -> str:
        """How messages name this layer: ``<method> on layer '<name>'``."""
        return f"{self.method} on layer {self.name!r}"

    def error(self, message: str) -> RankwiseError:
        return RankwiseError(f"{self.owner}: {message}")

    @property
    def factory(self) -> dict[str, Any]:
        """``device`` / ``dtype`` keywords matching the base weight, for allocations."""
        return {"device": self.base.weight.device, "dtype": self.base.weight.dtype}

    def initialize(self, stats: Any = None) -> None:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.delta_weight().T

    def base_offset(self) -> torch.Tensor:
        """What a ``rewrites_base`` method moved out of the original weight (``out x in``)."""
        raise NotImplementedError(f"{type(self).__name__} sets rewrites_base but does not define base_offset()")

    def regularization(self) -> torch.Tensor | None:
        """A loss term the training loop adds to the task loss (default none)."""
        return None

    def effective_rank(self) -> int | None:
        """Ranks of the update still in use, for methods that prune or grow them (default None)."""
        return None

    def lora_parameters(self) -> LoraParameters | None:
        """The trainable ``A``, ``B`` and ``scaling`` when the update is exactly ``scaling * B @ A``
        with both factors trained as plain LoRA factors; None for every other update form."""
        return None

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B, A)`` in fp32 with ``B @ A == delta_weight()`` (scaling folded in) when the update is
        exactly low-rank-factored (``B`` out x k, ``A`` k x in); None otherwise. Used by
        ``export_peft`` to write an exact PEFT LoRA instead of a truncated-SVD approximation."""
        return None

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B0, A0)`` in fp32 with ``B0 @ A0 == base_offset()`` for ``rewrites_base`` methods whose
        offset is low-rank-factored; None otherwise."""
        return None

    # ----- provided behaviour --------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        return out + self.adapter_forward(self.dropout(x)).to(out.dtype)

    def _add_to_base(self, update: torch.Tensor, sign: float) -> None:
        weight = self.base.weight
        with torch.no_grad():
            weight.copy_((weight.float() + sign * update.float()).to(weight.dtype))

    def merge(self) -> None:
        """``W <- W + delta_weight()`` (fp32 arithmetic, written back in the weight's dtype)."""
        if not self.merged:
            with torch.no_grad():
                self._add_to_base(self.delta_weight(), +1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self._add_to_base(self.delta_weight(), -1.0)
            self.merged = False

    def apply_base_rewrite(self) -> None:
        """``W <- W - base_offset()`` for ``rewrites_base`` methods (no-op otherwise)."""
        if self.rewrites_base:
            with torch.no_grad():
                self._add_to_base(self.base_offset(), -1.0)

    def original_weight(self) -> torch.Tensor:
        """The base weight before ``adapt`` (fp32): ``W + base_offset()``, minus the delta if merged."""
        with torch.no_grad():
            weight = self.base.weight.float()
            if self.rewrites_base:
                weight = weight + self.base_offset().float()
            if self.merged:
                weight = weight - self.delta_weight().float()
        return weight

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (parameters and persistent buffers) outside ``self.base``."""
        return {
            key: value
            for key, value in self.state_dict(keep_vars=True).items()
            if not key.startswith("base.")
        }

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description from which ``load_adapter`` rebuilds this layer."""
        return {"method": self.method, "rank": self.rank, "alpha": self.alpha, "options": dict(self.options)}

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"
