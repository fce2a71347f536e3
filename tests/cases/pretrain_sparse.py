from cases.row_types import PretrainCase

CASES = [
    # SLTrain: r (m + n) factor weights + floor(delta m n) sparse values (arXiv 2406.02214)
    PretrainCase("sltrain", "sltrain", {"seed": 0}, lambda n_in, n_out, r: r * (n_in + n_out) + int(0.03 * n_in * n_out)),
    PretrainCase("sltrain-dense-support-refactor", "sltrain", {"seed": 1, "density": 0.2, "refactor_every": 2},
                 lambda n_in, n_out, r: r * (n_in + n_out) + int(0.2 * n_in * n_out)),
    # LOST: r (m + n) + m c, c = max(1, round(density n)) residual input channels (arXiv 2508.02668)
    PretrainCase("lost", "lost", {}, lambda n_in, n_out, r: r * (n_in + n_out) + n_out * max(1, round(0.05 * n_in))),
    PretrainCase("lost-quarter-channels-reset", "lost", {"channel_density": 0.25, "momentum_reset_every": 2},
                 lambda n_in, n_out, r: r * (n_in + n_out) + n_out * max(1, round(0.25 * n_in))),
]
