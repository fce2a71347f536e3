"""Common-suite rows of the whole-model subspace adapter (said): ``d`` = rank shared, one scalar per layer."""

from cases import AdapterCase

CASES = [
    AdapterCase("said", "said", {}, False, True, lambda n_in, n_out, r: 1, shared_trainable=lambda r: r),
    AdapterCase("said-sparse-did", "said", {"projection": "sparse", "layer_scalars": False}, False, True,
                lambda n_in, n_out, r: 0, shared_trainable=lambda r: r),
]
