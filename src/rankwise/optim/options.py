"""Option declarations the optimizers share, written once (see :mod:`rankwise.options`).

- :data:`ADAM`: the optimizer-wide hyperparameters of every Adam-based method (constructor
  keywords, stored in ``optimizer.defaults`` and so in every param group). A method that
  changes a default declares ``HYPERPARAMETERS = with_defaults(ADAM, eps=1e-8, ...)``: data,
  not a re-declared constructor.
- :data:`SUBSPACE`: the group keys of the GaLore family's projected group (``rank``,
  ``update_proj_gap``, ``scale``, ``proj_type``, ``moment_policy``, ``bias_correction``), with
  galore-torch's defaults; methods take them with their own defaults the same way.
- :data:`SEED`: the per-group seed of methods that draw random subspaces.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from rankwise.linalg.projections import PROJ_TYPES
from rankwise.options import Option

MOMENT_POLICIES = ("keep", "reset", "rotate")
BIAS_CORRECTIONS = ("global", "per_coordinate")

ADAM: dict[str, Option] = {
    "lr": Option(1e-3, float, low=0, help="learning rate"),
    "betas": Option(
        (0.9, 0.999), tuple, item=float, length=2, low=0, high=1, high_open=True,
        help="Adam's decay rates (beta1, beta2) of the first and second moments",
    ),
    "eps": Option(1e-6, float, low=0, help="added to sqrt(v) in Adam's denominator"),
    "weight_decay": Option(0.0, float, low=0, help="decoupled weight decay: W -= lr * weight_decay * W after each step"),
    "correct_bias": Option(True, bool, help="scale the step by Adam's bias correction sqrt(1 - b2^t) / (1 - b1^t)"),
}

SUBSPACE: dict[str, Option] = {
    "rank": Option(128, int, low=1, help="rank r of the subspace (at most min(m, n) of every projected weight)"),
    "update_proj_gap": Option(200, int, low=1, help="steps T between subspace refreshes"),
    "scale": Option(0.25, float, low=0, low_open=True, help="scale alpha of the update mapped back to the weight"),
    "proj_type": Option(
        "std", str, choices=PROJ_TYPES,
        help="projected side: std = the shorter one, reverse_std = the longer one, left, right, full = both",
    ),
    "moment_policy": Option(
        "keep", str, choices=MOMENT_POLICIES,
        help="Adam's moments at a subspace switch: keep them, reset them, or rotate them into the new coordinates",
    ),
    "bias_correction": Option(
        "global", str, choices=BIAS_CORRECTIONS,
        help="global: Adam's correction by the moments' age (the papers'); per_coordinate: after a rotate switch "
        "a coordinate new to the subspace is corrected like a fresh start",
    ),
}

SEED: dict[str, Option] = {
    "seed": Option(0, int, help="seed of the random subspaces (combined with the parameter's position and the step)"),
}


def with_defaults(options: Mapping[str, Option], **defaults: Any) -> dict[str, Option]:
    """``options`` with the given defaults replaced (each checked against its declaration)."""
    unknown = sorted(set(defaults) - set(options))
    if unknown:
        raise KeyError(f"no declared option(s) {', '.join(unknown)} to change the default of")
    return {name: replace(option, default=defaults[name]) if name in defaults else option
            for name, option in options.items()}


def without(options: Mapping[str, Option], *names: str) -> dict[str, Option]:
    """``options`` minus ``names`` (a method that cannot honour a shared key does not declare it)."""
    return {name: option for name, option in options.items() if name not in names}
