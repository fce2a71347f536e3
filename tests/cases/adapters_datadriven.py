"""Common-suite rows of the data-driven initialisations (corda, eva, lora_ga, lora_sb)."""

from cases import AdapterCase


def lora_shaped(n_in: int, n_out: int, r: int) -> int:
    return r * (n_in + n_out)


CASES = [
    AdapterCase("corda-ipm", "corda", {"mode": "ipm"}, True, True, lora_shaped),
    AdapterCase("corda-kpm", "corda", {"mode": "kpm"}, True, True, lora_shaped),
    # The randomized SVD paths (the batched decompositions run in every row).
    AdapterCase("corda-ipm-niter", "corda", {"mode": "ipm", "niter": 2}, True, True, lora_shaped),
    # rho=1: no redistribution, so every layer keeps rank r and the count is the LoRA formula.
    AdapterCase("eva-rho1", "eva", {"rho": 1.0}, True, True, lora_shaped),
    AdapterCase("eva-rho1-niter", "eva", {"rho": 1.0, "niter": 2}, True, True, lora_shaped),
    AdapterCase("lora_ga", "lora_ga", {}, True, True, lora_shaped),
    AdapterCase("lora_ga-niter", "lora_ga", {"niter": 2}, True, True, lora_shaped),
    # The paper's start: the model is moved by the simulated first update, so not the base at init.
    AdapterCase("lora_sb", "lora_sb", {}, True, False, lambda n_in, n_out, r: r * r),
    AdapterCase("lora_sb-output-preserving-sgd", "lora_sb", {"start_from_update": False, "update": "sgd"},
                True, True, lambda n_in, n_out, r: r * r),
]
