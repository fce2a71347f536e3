"""Common-suite rows of the inits that produce a quantized base (loftq)."""

from cases import AdapterCase

CASES = [
    # Q + s B A approximates W: close to the base at init, not equal; the base becomes NF4 codes.
    AdapterCase("loftq", "loftq", {}, False, False, lambda n_in, n_out, r: r * (n_in + n_out), quantizes_base=True),
    AdapterCase("loftq-int8-iter2", "loftq", {"scheme": "int8", "loftq_iter": 2}, False, False,
                lambda n_in, n_out, r: r * (n_in + n_out), quantizes_base=True),
]
