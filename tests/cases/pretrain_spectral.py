from cases.row_types import PretrainCase

# SST: r active singular-vector pairs + all k = min(m, n) singular values (arXiv 2405.15481)
CASES = [
    PretrainCase("sst", "sst", {"seed": 0, "resample_every": 2}, lambda n_in, n_out, r: r * (n_in + n_out) + min(n_in, n_out)),
    PretrainCase("sst-global-rng-round-1", "sst", {"resample_every": 1, "iterations_per_round": 1},
                 lambda n_in, n_out, r: r * (n_in + n_out) + min(n_in, n_out)),
]
