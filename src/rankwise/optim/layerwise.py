"""Layerwise mode: each parameter is stepped from its post-accumulate-grad hook, during backward.

``rankwise.optim.build(model, name, ..., layerwise=True, accumulation_steps=N)`` returns a
:class:`LayerwiseOptimizer` wrapping the optimizer ``name`` builds. Without accumulation
(``N = 1``) a parameter's gradient is consumed the moment autograd finishes it: the hook
steps that one parameter (:meth:`rankwise.optim.lowrank.LowRankAdamW.step_parameter`) and frees ``.grad``, so full
gradients of different layers never coexist -- the peak holds one gradient instead of all
of them (the saving GaLore's paper reports with its per-layer weight updates, Section 4.3).

Gradient accumulation over ``N`` micro-batches: backward passes ``1 .. N-1`` of a window
let ``.grad`` accumulate as usual; in backward ``N`` each hook steps its parameter with the
accumulated gradient and frees it. So ``N`` micro-batches of loss ``/ N`` give the same
parameters as one step on the concatenated batch (up to float summation order). During the
window the accumulated gradients do coexist -- accumulation needs them -- so the memory
saving of layerwise mode holds within the last micro-batch only. The end of each backward pass is
detected with an autograd engine callback, so a parameter that got no gradient in the last
micro-batch but did earlier is still stepped (when that backward ends), and the count of
micro-batches does not depend on the training loop calling ``step()``.

Only the outermost backward pass counts. Reentrant gradient checkpointing
(``torch.utils.checkpoint(..., use_reentrant=True)``) runs a nested backward pass for every
recomputed segment, from inside the checkpoint node's backward; a callback queued there would
fire at the end of each segment. So when a gradient arrives inside a nested pass, the
end-of-backward callback is armed on the enclosing backward instead: a hook on the autograd
node running the nested pass queues it once that node has finished (recursively, for nested
checkpoints). torch exposes no reentrancy depth, so the enclosing node is found on the Python
stack, as the frame of ``torch.autograd.function.BackwardCFunction.apply`` that runs it.

The training loop does not change: ``step()`` and ``zero_grad()`` are no-ops (the work
happened in backward) and may be called after every micro-batch or every ``N``; the
wrapper shares ``param_groups`` and ``state`` with the wrapped optimizer, so an LR scheduler
built on it changes the learning rate the hooks use, ``state_dict()`` is the wrapped
optimizer's (interchangeable with a non-layerwise run) and ``state_bytes`` works.
:meth:`LayerwiseOptimizer.flush` steps the gradients of an unfinished window now.

Data parallel: see :mod:`rankwise.optim.distributed`. Under an initialised process group
(and an unwrapped model: DDP's hooks run before its all-reduce and its buckets hold every
gradient), parameters are broadcast from rank 0 at construction and each hook averages its
gradient over ranks (blocking all-reduce) before stepping. Every rank must produce gradients
for the same parameters in each backward (as DDP without ``find_unused_parameters``).

Not offered (RankwiseError): a ``closure``; clipping by the global gradient norm (the norm
does not exist yet when the first layer is stepped); a DDP-wrapped or FSDP2-sharded model;
``accumulation_steps`` that is not an integer >= 1; a rankwise optimizer whose class sets
``supports_layerwise = False`` (its step needs every parameter at once).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.optim import Optimizer

from rankwise.errors import RankwiseError
from rankwise.optim.base import OptimizerMethod
from rankwise.optim.distributed import average_gradient, broadcast_parameters, is_distributed, is_dtensor
from rankwise.optim.lowrank import LowRankAdamW
from rankwise.options import Option

_RUN_NODE_BACKWARD = torch.autograd.function.BackwardCFunction.apply.__code__


def enclosing_backward_node() -> Any:
    """The autograd node (a custom Function's backward) that is running a nested backward pass
    around the caller, or None when the caller runs in an outermost backward pass."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _RUN_NODE_BACKWARD:
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None

ACCUMULATION_STEPS = Option(1, int, low=1, help="micro-batches (backward passes) per optimizer step")

#: options of a training set-up that layerwise mode cannot honour, with the reason
UNSUPPORTED_OPTIONS = {
    "max_grad_norm": "clipping by the global gradient norm needs every gradient before any step, "
    "but layerwise mode steps each layer as soon as its gradient exists; train without clipping "
    "or without layerwise=True",
}


def check_layerwise(model: nn.Module, accumulation_steps: Any, options: Mapping[str, Any]) -> int:
    """RankwiseError unless layerwise mode can run on ``model``; returns ``accumulation_steps``."""
    steps = ACCUMULATION_STEPS.default if accumulation_steps is None else accumulation_steps
    steps = ACCUMULATION_STEPS.check("accumulation_steps", steps, "layerwise mode")
    for key, reason in UNSUPPORTED_OPTIONS.items():
        if key in options:
            raise RankwiseError(f"layerwise mode cannot honour {key}: {reason}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise RankwiseError(
            "layerwise mode cannot run on a DistributedDataParallel model: its gradient hooks fire before "
            "DDP's all-reduce and DDP's buckets keep every gradient alive; pass the unwrapped module "
            "(model.module) -- layerwise mode averages each gradient over the ranks itself"
        )
    if any(is_dtensor(p) for p in model.parameters()):
        raise RankwiseError(
            "layerwise mode does not support sharded (FSDP2 / DTensor) parameters: FSDP2 reduce-scatters "
            "gradients after the hooks run; use layerwise=False with fully_shard"
        )
    return steps


class LayerwiseOptimizer(Optimizer):
    """Wraps ``optimizer`` so each parameter steps inside backward (see module docstring).

    ``param_groups`` and ``state`` are the wrapped optimizer's; other attributes
    (``shared_buffers``, ``refresh_seconds``, ...) are read through from it.
    """

    def __init__(self, optimizer: Optimizer, *, accumulation_steps: int = 1) -> None:
        accumulation_steps = ACCUMULATION_STEPS.check("accumulation_steps", accumulation_steps, "layerwise mode")
        if isinstance(optimizer, OptimizerMethod) and not optimizer.supports_layerwise:
            raise RankwiseError(
                f"{type(optimizer).__name__} needs every parameter's gradient in one step and cannot run "
                "layerwise; use layerwise=False"
            )
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self._ready = False
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._bind()
        self._distributed = is_distributed()
        self._backward_count = 0  # outermost backward passes finished in the current accumulation window
        self._callback_queued = False
        self._node_hooks: list[Any] = []  # hooks on checkpoint nodes arming the end-of-backward callback
        self._handles: list[Any] = []
        self._group_of: dict[int, int] = {}
        for index, group in enumerate(self.param_groups):
            self._manage(group["params"], index)
        self._ready = True

    # ---- shared view of the wrapped optimizer

    def _bind(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def _manage(self, params: Iterable[torch.Tensor], group_index: int) -> None:
        params = list(params)
        if self._distributed:
            broadcast_parameters(params)
        for param in params:
            self._group_of[id(param)] = group_index
            self._handles.append(param.register_post_accumulate_grad_hook(self._on_gradient))

    def add_param_group(self, param_group: dict) -> None:
        if not self.__dict__.get("_ready"):  # Optimizer.__init__ registering the shared groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)
        self._bind()
        self._manage(self.param_groups[-1]["params"], len(self.param_groups) - 1)

    # ---- the hooks

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not self._callback_queued:
            self._arm_end_of_backward()
            self._callback_queued = True
        if self._backward_count == self.accumulation_steps - 1:
            self._step_one(param)

    def _arm_end_of_backward(self) -> None:
        """Queue :meth:`_end_of_backward` on the outermost running backward pass (module docstring)."""
        node = enclosing_backward_node()
        if node is None:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        else:  # the node's hook runs in the enclosing pass once the nested one has finished
            self._node_hooks.append(node.register_hook(lambda *_: self._arm_end_of_backward()))

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        for handle in self._node_hooks:  # a retained graph must not re-arm through them
            handle.remove()
        self._node_hooks.clear()
        self._backward_count += 1
        if self._backward_count == self.accumulation_steps:
            self.flush()

    @torch.no_grad()
    def _step_one(self, param: torch.Tensor) -> None:
        if self._distributed:
            average_gradient(param.grad)
        group = self.param_groups[self._group_of[id(param)]]
        if isinstance(self.optimizer, LowRankAdamW):
            self.optimizer.step_parameter(param, group)
        else:  # a torch optimizer: let its step() see only this parameter
            groups = self.optimizer.param_groups
            self.optimizer.param_groups = [{**group, "params": [param]}]
            try:
                self.optimizer.step()
            finally:
                self.optimizer.param_groups = groups
        param.grad = None

    def flush(self) -> None:
        """Step every parameter that still holds an accumulated gradient and start a new window."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_one(param)
        self._backward_count = 0

    # ---- the Optimizer interface a training loop calls

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """No-op: parameters were stepped during backward. A closure cannot be honoured."""
        if closure is not None:
            raise RankwiseError(
                "layerwise mode cannot take a closure: parameters are stepped inside backward, "
                "so re-evaluating the loss in step() would step them twice; use layerwise=False"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: stepped gradients are already freed, and gradients still accumulating in
        the current window must survive (call :meth:`flush` to consume them early)."""

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._bind()

    def remove_hooks(self) -> None:
        """Detach from the model (the parameters' hooks are removed; step() stays a no-op)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"LayerwiseOptimizer(accumulation_steps={self.accumulation_steps}, {self.optimizer!r})"
