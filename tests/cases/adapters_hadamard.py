from cases import AdapterCase

CASES = [
    # LoHa (FedPara, arXiv 2108.06098; LyCORIS): (W1a W1b) o (W2a W2b), two rank-r pairs
    AdapterCase("loha", "loha", {}, False, True, lambda n_in, n_out, r: 2 * r * (n_in + n_out)),
]
