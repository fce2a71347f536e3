from cases import AdapterCase

CASES = [
    # LoRA-Pro changes the optimizer, not the layer: LoRA's tensors, init (identity) and count.
    AdapterCase("lora_pro", "lora_pro", {}, False, True, lambda n_in, n_out, r: r * (n_in + n_out)),
    # LoRA-GGPO perturbs only in training mode: LoRA's tensors, identity at init (eval) and count.
    AdapterCase("lora_ggpo", "lora_ggpo", {}, False, True, lambda n_in, n_out, r: r * (n_in + n_out)),
]
