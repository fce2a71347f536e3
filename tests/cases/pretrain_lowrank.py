from cases.row_types import PretrainCase

CASES = [
    PretrainCase("lowrank", "lowrank", {"seed": 0}, lambda n_in, n_out, r: r * (n_in + n_out)),
    PretrainCase("lowrank-global-rng", "lowrank", {}, lambda n_in, n_out, r: r * (n_in + n_out)),
]
