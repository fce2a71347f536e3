"""The adapter layer contract: one layer (Linear, GPT-2 Conv1D, bitsandbytes 4-bit / 8-bit Linear,
Embedding, Conv2d -- :data:`LAYER_TYPES`) wrapped with a low-rank (or otherwise cheap) update.

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
                          supports=LINEAR_LIKE)

   (``needs_data`` is derived from the class's ``statistics``; passing a value that disagrees
   is a declaration error.) ``supports`` lists the layer kinds the method takes (names of
   :data:`LAYER_TYPES`; ``LINEAR_LIKE`` = linear, conv1d, linear4bit, linear8bit;
   ``FULL_PRECISION`` = linear, conv1d for methods that rewrite the base weight); ``adapt``
   refuses any other kind before it touches the model, and ``--help-method`` shows it. Write
   the method once, for the ``out x in`` matrix: read the weight with :meth:`AdapterLayer.base_weight`
   (dequantized, untransposed, fp32), allocate with ``self.factory`` (the base's compute dtype),
   and apply ``k x in`` / ``out x k`` factors with :meth:`AdapterLayer.project_in` /
   :meth:`AdapterLayer.project_out` where the method should also take embeddings and
   convolutions; never touch ``self.base.weight`` (Conv1D stores it transposed, bitsandbytes
   as codes).
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
       ``self.options``, ``self.in_features``, ``self.out_features`` of the matrix view,
       ``self.kind``, ``self.name``, ``self.dropout``), then check what one Option cannot
       express (constraints between options, e.g. ``target_r <= rank``; raise ``self.error(...)``) and ALLOCATE tensors
       with ``self.factory`` (device and compute dtype of the base), e.g. ``torch.empty(r, n,
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
   RankwiseError naming the method and layer. A layer knows nothing of other adapters: the
   framework's :class:`AdapterSet` holds several named ones on one module, each contributing
   :meth:`AdapterLayer.contribution` (override it, not ``forward``, for a training-time term).
3. Tests: add ONE row to ``CASES`` in the family's ``tests/cases/adapters_<family>.py``:
   ``AdapterCase("<id>", "<method>", {options}, needs_data, identity_at_init,
   lambda n_in, n_out, r: <trainable parameters of one layer>)``. The common suite fails for
   a registered method without a row. It runs every row on the tiny LLaMA at rank 4 with
   ``alpha = 2 * rank`` over all linear layers (data-driven rows get two batches with
   labels) and checks: output equal to the base at init (or different, if not promised),
   gradients on exactly the adapter parameters, the parameter count, a lower loss after 5
   Adam steps with frozen tensors unchanged, merge / unmerge / unload equality,
   ``original_weight()``, a save/load roundtrip onto a fresh base and (with PEFT installed)
   an export that PEFT loads onto the original base. The same row also runs on a tiny GPT-2
   and (the first row of each method) on all-MiniLM-L6-v2 (tests/test_adapters_models.py), and
   on an NF4 base (tests/test_adapters_quantized.py: identity at init, adapter-only gradients,
   save/load, lossy merge refused -- or the refusal of a method that does not support
   ``linear4bit``). Put method-specific checks (paper formulas on constructed inputs, the
   authors' code or PEFT as an oracle) in ``tests/test_adapters_<family or method>.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from rankwise.errors import RankwiseError
from rankwise.layers import ADAPTABLE_KINDS, QUANTIZED_KINDS, dense_weight, features, layer_kind, write_dense_weight
from rankwise.layers import compute_dtype as layer_compute_dtype
from rankwise.options import Option, declared_options, resolve
from rankwise.registry import Registry

#: Layer kinds an adapter can wrap (:func:`rankwise.layers.layer_kind`), by the names registrations
#: list in ``supports``, and what each one is.
LAYER_TYPES: dict[str, str] = {
    "linear": "torch.nn.Linear",
    "conv1d": "transformers Conv1D (GPT-2; weight stored in x out)",
    "linear4bit": "bitsandbytes Linear4bit (NF4 / FP4, QLoRA)",
    "linear8bit": "bitsandbytes Linear8bitLt (LLM.int8())",
    "embedding": "torch.nn.Embedding",
    "conv2d": "torch.nn.Conv2d (groups=1)",
}
assert set(LAYER_TYPES) == set(ADAPTABLE_KINDS)
#: what the registrations of most methods list: every Linear-like kind
LINEAR_LIKE = ("linear", "conv1d", "linear4bit", "linear8bit")
#: methods that rewrite the base weight need it in full precision
FULL_PRECISION = ("linear", "conv1d")

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


@dataclass(frozen=True)
class PeftNative:
    """One layer written in PEFT's own format for its method (for the methods PEFT has: DoRA,
    VeRA, RandLoRA, Uni-LoRA, LoHa, LoKr, MiSS, ...), so ``PeftModel.from_pretrained`` rebuilds it.

    ``peft_type`` is PEFT's ``peft_type`` (``"VERA"``, ``"LOHA"``; DoRA is ``"LORA"`` with
    ``use_dora``). ``config``: the method's fields of PEFT's config (``r``, ``alpha``,
    ``target_modules`` is added by the export), equal across the layers of one export.
    ``tensors``: this module's tensors keyed by PEFT's key suffix after the module path
    (``"vera_lambda_b"``, ``"hada_w1_a"``), in PEFT's layout. ``shared``: model-level tensors
    keyed by their whole PEFT key (VeRA's ``"base_model.vera_A"``), identical in every layer.
    """

    peft_type: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)


def check_adapter_name(name: Any) -> str:
    """A usable adapter name: a non-empty string without dots (it is a module key)."""
    if not isinstance(name, str) or not name or "." in name:
        raise RankwiseError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    return name


def supported_kind_check(method: str, supports: frozenset[str], name: str, module: nn.Module) -> None:
    """Refuse a layer whose kind the method's registration does not list, naming the methods that take it."""
    kind = layer_kind(module)
    if kind in supports:
        return
    what = LAYER_TYPES.get(kind, "a module no adapter can wrap") if kind else "a module no adapter can wrap"
    takers = [entry.name for entry in ADAPTERS.entries() if kind in entry.supports]
    hint = ""
    if kind in QUANTIZED_KINDS and set(FULL_PRECISION) <= supports:
        hint = (f"; {method} rewrites the base weight from its full-precision value: adapt the full-precision "
                "model, then call rankwise.quantize(model, 'nf4') -- it quantizes the residual (QPiSSA) -- or "
                "use loftq, which quantizes the base itself")
    raise RankwiseError(
        f"{method} cannot adapt layer {name!r}: it is a {type(module).__name__} ({what}); {method} supports "
        f"{', '.join(sorted(supports)) or 'nothing'}; methods that take {kind or type(module).__name__}: "
        f"{', '.join(takers) or 'none'}{hint}. Exclude the layer from targets or choose one of those methods"
    )


class AdapterLayer(nn.Module):
    """``y = base(x) + adapter_forward(dropout(x))``; after :meth:`merge`, ``y = base'(x)``
    with ``W' = W + delta_weight()``.

    ``base`` is any adaptable layer (:data:`LAYER_TYPES`), always read through
    :mod:`rankwise.layers` as an ``out x in`` matrix (:meth:`base_weight`); the adapter's tensors
    live in the base's compute dtype (bitsandbytes bases stay quantized). Several named adapters
    on one module are an :class:`AdapterSet`; each layer contributes :meth:`contribution` to the
    base output: its update when active, the part it moved out of the base when inactive (so a
    disabled or switched-off adapter leaves the base model's output), nothing once merged.

    Subclasses implement ``__init__`` (cross-option checks + allocate), :meth:`initialize`,
    :meth:`delta_weight` and optionally :meth:`adapter_forward`; see the module docstring.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {"dropout": DROPOUT}
    statistics: ClassVar[tuple[str, ...]] = ()
    rewrites_base: ClassVar[bool] = False
    #: True for inits that swap the base layer for another one in ``apply_base_rewrite`` (LoftQ: its quantization)
    replaces_base: ClassVar[bool] = False
    #: the ``rankwise.optim`` name of the optimizer the method's paper trains it with (LoRA-Pro);
    #: None: any optimizer (the bench then uses AdamW)
    training_optimizer: ClassVar[str | None] = None
    #: seconds ``adapt`` spent in this layer's :meth:`initialize` (None: built by ``load_adapter``)
    init_seconds: float | None = None
    #: ``||W - base_offset()||_F / ||W||_F`` after the init of a ``rewrites_base`` method: the
    #: share of the weight left in the base (None otherwise)
    init_residual: float | None = None

    def __init__(
        self,
        base: nn.Module,
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
        self.kind = layer_kind(base)
        if self.kind not in ADAPTABLE_KINDS:
            raise self.error(f"cannot wrap a {type(base).__name__}; adaptable layers: {', '.join(LAYER_TYPES.values())}")
        if self.kind == "conv2d" and base.groups != 1:
            raise self.error(f"cannot wrap a grouped convolution (groups={base.groups}); exclude it from targets")
        self.base = base
        self.out_features, self.in_features = features(base)
        self.adapter_name = "default"
        self.enabled = True
        #: the other adapters on the same module (set by AdapterSet; a tuple, not submodules)
        self.siblings: tuple[AdapterLayer, ...] = ()
        self.check_rank(self.name, self.in_features, self.out_features, rank)
        self.rank = int(rank)
        alpha = ALPHA.check("alpha", alpha, self.owner)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.options = self.resolve_options(options, owner=self.owner)
        self.shared = shared or {}
        if self.rewrites_base and self.kind in QUANTIZED_KINDS:
            raise self.error(
                f"{self.method} with these options rewrites the base weight, which needs it in full precision "
                f"(the base is {type(base).__name__}); adapt the full-precision model, then rankwise.quantize(model, "
                "'nf4') quantizes the residual (QPiSSA)"
            )
        dropout = self.options["dropout"]
        # indices have nothing to drop (PEFT's embedding LoRA also ignores lora_dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 and self.kind != "embedding" else nn.Identity()
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
    def collect_statistics(
        cls, model: nn.Module, names: list[str], data: list[Any], options: dict[str, Any], *, loss_fn: Any = None
    ) -> dict:
        """Per-layer statistics for a data-driven init (default: the kinds in ``statistics``;
        ``loss_fn(model, batch)`` is the loss of gradient statistics for models without one)."""
        from rankwise.calibration import collect_statistics

        return collect_statistics(model, names, data, cls.statistics, loss_fn=loss_fn)

    @classmethod
    def allocate_ranks(
        cls, rank: int, bases: dict[str, nn.Module], stats: dict, options: dict[str, Any]
    ) -> dict[str, int]:
        """Rank of each layer; default the same ``rank`` everywhere."""
        return {name: rank for name in bases}

    @classmethod
    def prepare_initialization(cls, layers: dict[str, "AdapterLayer"], stats: dict) -> None:
        """Hook: work the layers of one ``adapt`` call share before their :meth:`initialize`
        (e.g. one batched SVD of every same-shape weight); default none."""

    @classmethod
    def make_shared(cls, bases: dict[str, nn.Module], rank: int, options: dict[str, Any]) -> dict[str, torch.Tensor]:
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
        """``device`` and the base's compute dtype (its weight's dtype for dense layers), for allocations."""
        return {"device": self.base.weight.device, "dtype": layer_compute_dtype(self.base)}

    @property
    def quantized(self) -> bool:
        return self.kind in QUANTIZED_KINDS

    def base_weight(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The base model's ``out x in`` weight as this adapter sees it (fp32 by default): the stored
        (dequantised, untransposed) matrix plus what other adapters on the module moved out of it."""
        weight = dense_weight(self.base, dtype)
        for sibling in self.siblings:
            if sibling.rewrites_base:
                weight = weight + sibling.base_offset().to(weight)
            if sibling.merged:
                weight = weight - sibling.delta_weight().to(weight)
        return weight

    # ----- the base seen as a matrix: x -> x M^T on any layer kind -----------------------------

    def project_in(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """``x M^T`` for a ``k x in`` matrix ``M`` (a gather of ``M``'s columns for an embedding's
        indices; a ``k``-channel convolution with ``M`` reshaped to kernels for Conv2d)."""
        if self.kind == "embedding":
            base = self.base
            return F.embedding(x, matrix.T, base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
        if self.kind == "conv2d":
            base = self.base
            kernels = matrix.reshape(matrix.shape[0], *base.weight.shape[1:])
            return F.conv2d(x.to(matrix.dtype), kernels, None, base.stride, base.padding, base.dilation)
        return x.to(matrix.dtype) @ matrix.T

    def project_out(self, hidden: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """``h M^T`` on the feature dimension for an ``out x k`` matrix (a 1 x 1 convolution for Conv2d)."""
        if self.kind == "conv2d":
            return F.conv2d(hidden, matrix[:, :, None, None])
        return hidden @ matrix.T

    def initialize(self, stats: Any = None) -> None:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_in(x, self.delta_weight())

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

    def peft_native(self) -> PeftNative | None:
        """This layer in PEFT's own format for its method, when PEFT has the method; None for the
        LoRA export (exact factors, or the best rank-k LoRA of the update with its error)."""
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

    def contribution(self, x: torch.Tensor) -> torch.Tensor | None:
        """What this adapter adds to the base output: its update when active and unmerged, the
        part it moved out of the base when inactive (``rewrites_base``), else nothing."""
        if self.merged:
            return None
        if self.enabled:
            return self.adapter_forward(self.dropout(x))
        if self.rewrites_base:
            return self.offset_forward(x)
        return None

    def offset_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x base_offset()^T`` (two thin products when the offset is factored)."""
        factors = self.base_offset_factors()
        if factors is None:
            return self.project_in(x, self.base_offset().to(self.factory["dtype"]))
        up, down = (t.to(self.factory["dtype"]) for t in factors)
        return self.project_out(self.project_in(x, down), up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        extra = self.contribution(x)
        return out if extra is None else out + extra.to(out.dtype)

    def _add_to_base(self, update: torch.Tensor, sign: float) -> None:
        """``W <- W + sign * update`` in fp32, written back through :func:`rankwise.layers.write_dense_weight`."""
        with torch.no_grad():
            write_dense_weight(self.base, dense_weight(self.base, torch.float32) + sign * update.float())

    def refuse_lossy(self, action: str, allow_lossy: bool) -> None:
        """Writing into a quantized base rounds the result to its codes: only with ``allow_lossy=True``."""
        if self.quantized and not allow_lossy:
            raise self.error(
                f"cannot {action} into the quantized base ({type(self.base).__name__}) exactly: it dequantizes, "
                "adds the update and quantizes again, which rounds the merged weight to the nearest codes "
                "(docs/real-models.md gives the size of that error); pass allow_lossy=True to accept it, or "
                "keep the adapter unmerged"
            )

    def merge(self, *, allow_lossy: bool = False) -> None:
        """``W <- W + delta_weight()`` (fp32 arithmetic, written back in the weight's dtype or requantized)."""
        if not self.merged:
            self.refuse_lossy("merge", allow_lossy)
            with torch.no_grad():
                self._add_to_base(self.delta_weight(), +1.0)
            self.merged = True

    def unmerge(self, *, allow_lossy: bool = False) -> None:
        if self.merged:
            self.refuse_lossy("unmerge", allow_lossy)
            with torch.no_grad():
                self._add_to_base(self.delta_weight(), -1.0)
            self.merged = False

    def apply_base_rewrite(self) -> None:
        """``W <- W - base_offset()`` for ``rewrites_base`` methods (no-op otherwise)."""
        if self.rewrites_base:
            with torch.no_grad():
                self._add_to_base(self.base_offset(), -1.0)

    def undo_base_rewrite(self) -> None:
        """``W <- W + base_offset()``: the inverse of :meth:`apply_base_rewrite` (no-op otherwise)."""
        if self.rewrites_base:
            with torch.no_grad():
                self._add_to_base(self.base_offset(), +1.0)

    def original_weight(self) -> torch.Tensor:
        """The base weight before ``adapt`` (fp32): ``W + base_offset()``, minus the delta if merged."""
        with torch.no_grad():
            weight = self.base_weight()
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
        return (f"method={self.method}, adapter={self.adapter_name!r}, rank={self.rank}, alpha={self.alpha}, "
                f"enabled={self.enabled}, merged={self.merged}")


class AdapterSet(nn.Module):
    """Several named adapters on one module: ``y = base(x) + sum_a contribution_a(x)``.

    ``adapters`` maps adapter names to their :class:`AdapterLayer`; the base is registered here
    once (the layers hold it as a plain attribute, so the state dict names it once).
    """

    def __init__(self, base: nn.Module, layers: dict[str, AdapterLayer]) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        for name, layer in layers.items():
            self.add(name, layer)

    def add(self, name: str, layer: AdapterLayer) -> None:
        if "base" in layer._modules:
            del layer._modules["base"]
            object.__setattr__(layer, "base", self.base)
        self.adapters[name] = layer
        self._link()

    def remove(self, name: str) -> AdapterLayer:
        layer = self.adapters[name]
        del self.adapters[name]
        layer.siblings = ()
        self._link()
        return layer

    def _link(self) -> None:
        layers = list(self.adapters.values())
        for layer in layers:
            layer.siblings = tuple(other for other in layers if other is not layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for layer in self.adapters.values():
            extra = layer.contribution(x)
            if extra is not None:
                out = out + extra.to(out.dtype)
        return out


def standalone(layer: AdapterLayer) -> AdapterLayer:
    """``layer`` taken out of an :class:`AdapterSet`, its base registered on it again."""
    base = layer.__dict__.pop("base", None)
    if base is not None:
        layer.base = base
    layer.siblings = ()
    return layer
