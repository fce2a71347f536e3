"""How each kind of set-up changes the model and what trains it: one table, kind -> preparation.

A preparation takes the set-up, the freshly built model (changed in place) and a
:class:`SetUpContext`, and returns a :class:`Prepared`: the optimizer that trains the model
and the :class:`~rankwise.training.TrainingHooks` the pillar installed (adapter
regularisers and rank schedules, a parametrisation's own hooks). The runner trains every
kind the same way with them; adding a kind is one function and one entry in ``KINDS``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.training import TrainingHooks

if TYPE_CHECKING:
    from rankwise.bench.setup import SetUp
    from rankwise.data.batches import TokenBatches

#: batches a data-driven method (adapter init, compression calibration) reads before training
DATA_BATCHES = 4


@dataclass(frozen=True)
class SetUpContext:
    """What a preparation may read besides the set-up and the model."""

    hidden_size: int
    #: a copy of the run's training stream, for data-driven inits and calibration (None: no data)
    data_batches: TokenBatches | None
    steps: int
    #: the submodule adapters go on ("" = the whole model; the encoder of a *ForMaskedLM)
    adapter_root: str = ""
    #: the run's loss on a batch of the full model, for data-driven inits of models that compute
    #: no loss of their own (None: ``model(**batch).loss``)
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None


@dataclass
class Prepared:
    """What a set-up installed: the optimizer that trains the model, the training-time hooks and,
    when the method needs its own, the learning-rate schedule (a callable
    ``(optimizer, *, warmup_steps, total_steps) -> scheduler``; None = the runner's cosine)."""

    optimizer: torch.optim.Optimizer
    hooks: tuple[TrainingHooks, ...] = ()
    schedule: Callable[..., Any] | None = None


class AdapterHooks(TrainingHooks):
    """The adapter pillar's training-time hooks: the layers' regularisers and their step schedules."""

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        from rankwise.adapters import regularization_loss

        return regularization_loss(model)

    def after_step(self, model: nn.Module, *, step: int, total_steps: int, optimizer: Any) -> None:
        from rankwise.adapters import after_step

        after_step(model, step=step, total_steps=total_steps, optimizer=optimizer)


def _rank_keyword(setup: SetUp, context: SetUpContext) -> dict[str, int]:
    rank = setup.resolved_rank(context.hidden_size)
    return {} if rank is None else {"rank": rank}


def _data_for(needs_data: bool, context: SetUpContext) -> list[dict] | None:
    if not needs_data:
        return None
    if context.data_batches is None:
        raise RankwiseError("this set-up's method is data-driven but the run gave it no data batches")
    batches = [next(context.data_batches) for _ in range(DATA_BATCHES)]
    if context.loss_fn is not None:  # the model computes no loss: statistics read the inputs only
        batches = [{"input_ids": batch["input_ids"]} for batch in batches]
    return batches


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


#: the options torch.optim.AdamW takes besides lr
_TORCH_ADAMW_OPTIONS = frozenset({"betas", "eps", "weight_decay", "amsgrad"})


def _optimizer(setup: SetUp, model: nn.Module, default: str | None = None) -> torch.optim.Optimizer:
    """The set-up's ``optimizer`` (else ``default``, else AdamW) on the trainable parameters: plain
    ``torch.optim.AdamW`` for AdamW without options, else ``rankwise.optim.build``."""
    from rankwise import optim

    name = setup.optimizer or default or "adamw"
    if name == "adamw" and set(setup.optimizer_options) <= _TORCH_ADAMW_OPTIONS:
        # also for models without Linear layers (Monarch, SST), which optim.build cannot group
        return torch.optim.AdamW(_trainable(model), lr=setup.lr, **setup.optimizer_options)
    return optim.build(model, name, lr=setup.lr, **setup.optimizer_options)


def _full(setup: SetUp, model: nn.Module, context: SetUpContext) -> Prepared:
    """AdamW on every parameter."""
    return Prepared(torch.optim.AdamW(model.parameters(), lr=setup.lr))


def _optim(setup: SetUp, model: nn.Module, context: SetUpContext) -> Prepared:
    """``rankwise.optim.build(method)`` on every parameter."""
    from rankwise import optim

    options = setup.resolved_options(context.steps)
    return Prepared(optim.build(model, setup.method, lr=setup.lr, **_rank_keyword(setup, context), **options))


def _reference(setup: SetUp, model: nn.Module, context: SetUpContext) -> Prepared:
    """A reference package's optimizer on the split ``optim`` uses."""
    from rankwise.bench.references import build_reference

    options = setup.resolved_options(context.steps)
    return Prepared(build_reference(model, setup.method, lr=setup.lr, **_rank_keyword(setup, context), **options))


def _adapter(setup: SetUp, model: nn.Module, context: SetUpContext) -> Prepared:
    """``rankwise.adapt(method)`` on the adapter root, then AdamW on the adapter (or the set-up's
    ``optimizer``, or the optimizer the method names, through ``rankwise.optim.build`` with the
    set-up's ``optimizer_options``)."""
    from rankwise import adapters

    entry = adapters.ADAPTERS.entry(setup.method)
    root = model.get_submodule(context.adapter_root) if context.adapter_root else model
    extra: dict[str, Any] = {}
    if entry.needs_data and context.loss_fn is not None and "loss_fn" in inspect.signature(adapters.adapt).parameters:
        full_model, loss_fn = model, context.loss_fn
        extra["loss_fn"] = lambda _root, batch: loss_fn(full_model, batch)
    adapters.adapt(root, setup.method, **_rank_keyword(setup, context),
                   data=_data_for(entry.needs_data, context), **extra, **setup.resolved_options(context.steps))
    # A method may name the optimizer its paper trains it with (LoRA-Pro); AdamW otherwise.
    optimizer = _optimizer(setup, model, getattr(entry.obj, "training_optimizer", None))
    return Prepared(optimizer, (AdapterHooks(),))


def _quantized_adapter(setup: SetUp, model: nn.Module, context: SetUpContext) -> Prepared:
    """QLoRA: ``rankwise.quantize(model, "nf4")`` (double quantization, compute in the weights' dtype),
    then the ``adapter`` preparation over the 4-bit base."""
    from rankwise.quantize import quantize

    quantize(model, "nf4")
    return _adapter(setup, model, context)


def _parametrize(setup: SetUp, model: nn.Module, context: SetUpContext) -> Prepared:
    """``rankwise.pretrain`` parametrisation ``method``, then AdamW (or the set-up's
    ``optimizer``, with its ``optimizer_options``); the parametrisation is a hook and gives the schedule."""
    from rankwise.pretrain import parametrisation

    try:
        method = parametrisation(setup.method, **_rank_keyword(setup, context), **setup.resolved_options(context.steps))
    except RankwiseError as exc:
        raise RankwiseError(f"set-up {setup.name!r}: {exc}") from None
    method.apply(model)
    return Prepared(_optimizer(setup, model), (method,), method.schedule)


def _compress(setup: SetUp, model: nn.Module, context: SetUpContext) -> Prepared:
    """``rankwise.compress(method, ratio)`` of the model (calibrated on the run's own batches when
    the method is data-driven), then AdamW (or the set-up's ``optimizer``) on every trainable
    parameter (the factors included)."""
    from rankwise.compress import COMPRESSORS, compress

    if setup.ratio is None:
        raise RankwiseError(f"set-up {setup.name!r}: a compression set-up needs a ratio")
    entry = COMPRESSORS.entry(setup.method)
    with torch.no_grad():
        compress(model, setup.method, ratio=setup.ratio, data=_data_for(entry.needs_data, context),
                          **setup.resolved_options(context.steps))
    return Prepared(_optimizer(setup, model))


def _compress_lrc(setup: SetUp, model: nn.Module, context: SetUpContext) -> Prepared:
    """WeLore's fine-tuning: ``rankwise.compress(method, ratio)``, then AdamW on the low-rank components'
    factors only (``rankwise.compress.trainable_lrc``: the dense N-LRC layers, embeddings and norms frozen)."""
    from rankwise.compress import trainable_lrc

    _compress(setup, model, context)
    return Prepared(torch.optim.AdamW(trainable_lrc(model), lr=setup.lr))


#: set-up kind -> the preparation that applies it
KINDS: dict[str, Callable[[SetUp, nn.Module, SetUpContext], Prepared]] = {
    "full": _full,
    "optim": _optim,
    "reference": _reference,
    "adapter": _adapter,
    "quantized_adapter": _quantized_adapter,
    "parametrize": _parametrize,
    "compress": _compress,
    "compress_lrc": _compress_lrc,
}


def prepare(
    setup: SetUp, model: nn.Module, hidden_size: int, data_batches: TokenBatches | None, steps: int,
    *, adapter_root: str = "", loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
) -> Prepared:
    """Apply ``setup`` to ``model`` in place; return the optimizer and hooks that train it for ``steps``."""
    if setup.kind not in KINDS:
        raise RankwiseError(f"set-up {setup.name!r} has unknown kind {setup.kind!r}; known: {', '.join(KINDS)}")
    return KINDS[setup.kind](setup, model, SetUpContext(hidden_size, data_batches, steps, adapter_root, loss_fn))
