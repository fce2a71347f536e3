"""Common-suite rows of the dynamic-rank methods (dylora, adalora, increlora, sora).

The suite trains without calling ``after_step``, so these rows check each method's
parametrisation (DyLoRA at its first sampled rank, AdaLoRA / IncreLoRA before any pruning or
growth, SoRA before any thresholding); tests/test_adapters_dynamic.py drives the schedules.
"""

from cases import AdapterCase


def lora_shaped(n_in: int, n_out: int, r: int) -> int:
    return r * (n_in + n_out)


def svd_form(n_in: int, n_out: int, r: int) -> int:
    """P (out x r), lambda (r), Q (r x in); for IncreLoRA r is the pre-allocated capacity."""
    return r * (n_in + n_out + 1)


CASES = [
    AdapterCase("dylora", "dylora", {}, False, True, lora_shaped),
    AdapterCase("dylora-not-frozen", "dylora", {"frozen": False, "min_rank": 2, "eval_rank": 3}, False, True,
                lora_shaped),
    AdapterCase("adalora", "adalora", {"target_r": 2}, False, True, svd_form),
    AdapterCase("increlora", "increlora", {"advance_learning": False}, False, True, svd_form),
    AdapterCase("sora", "sora", {"sparse_lambda": 0.5}, False, True, lambda n_in, n_out, r: r * (n_in + n_out) + r),
]
