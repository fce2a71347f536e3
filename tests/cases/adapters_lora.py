from cases import AdapterCase

CASES = [
    AdapterCase("lora", "lora", {}, False, True, lambda n_in, n_out, r: r * (n_in + n_out)),
    AdapterCase("lora-rslora-dropout", "lora", {"rslora": True, "dropout": 0.1}, False, True,
                lambda n_in, n_out, r: r * (n_in + n_out)),
]
