from cases import AdapterCase

CASES = [
    AdapterCase("pissa", "pissa", {}, False, True, lambda n_in, n_out, r: r * (n_in + n_out)),
    AdapterCase("olora", "olora", {}, False, True, lambda n_in, n_out, r: r * (n_in + n_out)),
    AdapterCase("loldu", "loldu", {}, False, True, lambda n_in, n_out, r: r + 1),
    AdapterCase("loldu-fixed-scaling", "loldu", {"train_scaling": False}, False, True, lambda n_in, n_out, r: r),
    AdapterCase("svfit", "svfit", {}, False, True, lambda n_in, n_out, r: r),
    AdapterCase("sorsa", "sorsa", {"gamma": 0.1}, False, True, lambda n_in, n_out, r: r * (n_in + n_out) + r),
]
