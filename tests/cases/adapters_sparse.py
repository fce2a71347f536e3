"""Common-suite rows of the sparse fine-tuning adapters (s2ft, sara)."""

from cases import AdapterCase

CASES = [
    AdapterCase("s2ft", "s2ft", {}, False, True, lambda n_in, n_out, r: r * n_out),
    AdapterCase("s2ft-heads-of-output-channels", "s2ft", {"axis": "out", "group_size": 2}, False, True,
                lambda n_in, n_out, r: r * n_in),
]
CASES += [
    AdapterCase("sara", "sara", {}, False, True, lambda n_in, n_out, r: min(r * (n_in + n_out), n_in * n_out)),
]
