"""Numerical guards shared by every optimizer (the framework, layerwise and FSDP paths)."""

from __future__ import annotations

from rankwise.linalg.svd import all_finite

#: True when no entry of a gradient is NaN or inf (one reduction: :func:`rankwise.linalg.svd.all_finite`)
gradient_is_finite = all_finite
