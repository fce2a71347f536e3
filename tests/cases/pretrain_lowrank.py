from cases.row_types import PretrainCase

CASES = [
    PretrainCase("lowrank", "lowrank", {"seed": 0}, lambda n_in, n_out, r: r * (n_in + n_out)),
    PretrainCase("lowrank-global-rng", "lowrank", {}, lambda n_in, n_out, r: r * (n_in + n_out)),
    PretrainCase("lowrank-refactor-reset", "lowrank", {"seed": 0, "refactor_every": 2, "momentum_reset_every": 3},
                 lambda n_in, n_out, r: r * (n_in + n_out)),
]
