from cases.row_types import CompressCase

CASES = [
    # Eckart-Young: the exact truncation is the optimum (up to float64 rounding)
    CompressCase("svd", "svd", {}, needs_data=False, weight_error_factor=1 + 1e-9),
    # Halko et al.: 4 power iterations on a geometric spectrum decaying by 0.7 are within 1%
    CompressCase("svd-randomized", "svd", {"niter": 4, "seed": 1}, needs_data=False, weight_error_factor=1.01),
    # WeLore factorises by the plain truncated SVD: at a given rank, the Eckart-Young optimum
    CompressCase("welore", "welore", {}, needs_data=False, weight_error_factor=1 + 1e-9),
    CompressCase("welore-min-ratio", "welore", {"min_ratio": 0.25}, needs_data=False, weight_error_factor=1 + 1e-9),
]
