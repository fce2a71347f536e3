from cases import AdapterCase

CASES = [
    AdapterCase("vera", "vera", {}, False, True, lambda n_in, n_out, r: n_out + r),
    AdapterCase("vera-seed-7", "vera", {"seed": 7, "d_initial": 0.5}, False, True, lambda n_in, n_out, r: n_out + r),
]
