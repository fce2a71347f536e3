"""Numerical guards shared by every optimizer (the framework, layerwise and FSDP paths)."""

from __future__ import annotations

import torch


def gradient_is_finite(grad: torch.Tensor) -> bool:
    """True when no entry of ``grad`` is NaN or inf: one reduction instead of an element-wise
    mask (~20x faster on CPU for a 1024 x 1024 weight). fp16 sums overflow at 65504, so fp16
    accumulates in fp32 (bf16 already has fp32's range); a finite gradient whose sum exceeds
    fp32's range (|sum| > 3.4e38) also counts as non-finite, a step worth skipping anyway."""
    if grad.is_meta:  # shapes only (the memory bench): no values to check
        return True
    total = grad.sum(dtype=torch.float32) if grad.dtype == torch.float16 else grad.sum()
    return bool(torch.isfinite(total))
