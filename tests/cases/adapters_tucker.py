from cases import AdapterCase

CASES = [
    # FLoRA (arXiv 2405.14739): Tucker core r x r between factors of both modes (Linear)
    AdapterCase("flora", "flora", {}, False, True, lambda n_in, n_out, r: r * r + r * (n_in + n_out)),
]
