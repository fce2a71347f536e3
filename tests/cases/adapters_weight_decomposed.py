from cases import AdapterCase

CASES = [
    # DoRA (arXiv 2402.09353): LoRA on the direction, a trained magnitude per output feature
    AdapterCase("dora", "dora", {}, False, True, lambda n_in, n_out, r: r * (n_in + n_out) + n_out),
    AdapterCase("dora-rslora-dropout", "dora", {"rslora": True, "dropout": 0.1}, False, True,
                lambda n_in, n_out, r: r * (n_in + n_out) + n_out),
]
