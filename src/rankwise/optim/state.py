"""Measuring optimizer state: the bytes a checkpoint of it holds."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from rankwise.optim.distributed import is_dtensor


def state_bytes(optimizer: Optimizer) -> int:
    """Exact bytes held by the optimizer's state tensors (each storage once) and, for rankwise
    optimizers, ``shared_buffers`` (e.g. one DCT matrix per size); for DTensor state (torch
    optimizers under FSDP2) this rank's shards; for meta-device state the bytes its shapes
    would hold. Works for any ``torch.optim.Optimizer``."""
    tensors = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    tensors += list(getattr(optimizer, "shared_buffers", {}).values())  # a LayerwiseOptimizer reads through
    tensors = [t.to_local() if is_dtensor(t) else t for t in tensors]
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        # meta tensors (the memory bench: shapes only) all report data_ptr 0: each is its own storage
        key = ("meta", id(tensor)) if tensor.is_meta else (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
