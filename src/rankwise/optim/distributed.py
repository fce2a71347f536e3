"""Distributed training with the low-rank optimizers: DDP, FSDP2 and layerwise data parallelism.

DDP (``DistributedDataParallel``): every rank's ``param.grad`` holds the all-reduced mean
gradient when ``optimizer.step()`` runs, so each rank computes the same update (SVDs are
deterministic for identical inputs; random projectors draw from per-parameter seeds, never
from the global RNG) and the replicas stay identical. Nothing here is needed for it.

FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters and gradients are DTensor shards
(``Shard(0)``: each rank holds a block of rows). :meth:`rankwise.optim.lowrank.LowRankAdamW.step_parameter`
dispatches them to :func:`step_sharded`:

* a projected parameter needs the whole gradient matrix (GaLore's SVD is of ``G``, not of a
  block of its rows, and the projection ``P^T G`` mixes all rows), so the full gradient and
  weight are all-gathered, every rank runs the same step on the full ``m x n`` matrix (its
  low-rank state -- ``2nr + mr`` for GaLore -- is replicated, not sharded) and keeps its own
  rows of the result;
* an unprojected parameter (plain AdamW, element-wise) is stepped on the local shard only,
  so its moments are sharded like the parameter.
A non-finite gradient anywhere in the parameter skips the step on every rank (one small
all-reduce), so shards never disagree on whether a step happened.

Layerwise data parallelism (``build(..., layerwise=True)`` on an unwrapped model under an
initialised process group): DDP cannot be combined with post-accumulate-grad hooks -- on
torch 2.13 the hook of a DDP-wrapped parameter sees the rank's *local* gradient, the bucket
all-reduce only lands in ``.grad`` when backward finishes -- and its buckets keep a flat copy
of every gradient, which is what layerwise mode exists to avoid. So layerwise mode averages
each gradient itself (:func:`average_gradient`, a blocking all-reduce inside the hook, on the
stepping micro-batch only) and steps it at once; see :mod:`rankwise.optim.layerwise`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist

from rankwise.optim.numerics import gradient_is_finite

NONFINITE_MESSAGE = "non-finite gradient: skipped the step of the affected parameter(s)"

try:  # DTensor exists on every torch this package supports; the guard keeps minimal builds importable
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 / tensor-parallel shard)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def step_sharded(optimizer: Any, param: torch.Tensor, group: Mapping[str, Any]) -> bool:
    """One step of the FSDP2 shard ``param`` (a DTensor) with ``optimizer.step_parameter``; True
    when it stepped.

    Projected groups: gather ``G`` and ``W``, step the full matrix, keep the local rows.
    Other groups: step the local shard (element-wise AdamW needs nothing else).
    """
    grad = param.grad
    finite = torch.tensor([int(gradient_is_finite(grad.to_local()))], dtype=torch.int32, device=grad.device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=param.device_mesh.get_group())
    if not bool(finite.item()):
        optimizer.warn_once("nonfinite", NONFINITE_MESSAGE)
        return False
    local = param.to_local()
    if "rank" not in group:
        return optimizer.step_parameter(param, group, weight=local, grad=grad.to_local())
    weight = param.full_tensor()
    stepped = optimizer.step_parameter(param, group, weight=weight, grad=grad.full_tensor())
    # every rank computed the same full result: take this rank's block without communication
    local.copy_(distribute_tensor(weight, param.device_mesh, param.placements, src_data_rank=None).to_local())
    return stepped


def average_gradient(grad: torch.Tensor) -> None:
    """In place: ``grad <- mean over ranks of grad`` (blocking all-reduce on the default group)."""
    dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    grad.div_(dist.get_world_size())


@torch.no_grad()
def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values into every rank's ``params`` (what DDP does at wrap time)."""
    for param in params:
        dist.broadcast(param.data, src=0)
