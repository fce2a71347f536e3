from cases.row_types import PretrainCase

# ReLoRA trains the two LoRA factors; W is frozen (it only absorbs merged updates). alpha = r / 4 keeps
# the release's scale alpha / r = 32 / 128 at rank 4. The common suite's 9 steps restart every 3 with a full
# optimizer reset (the release README's other recommended reset); the paper's 99% magnitude pruning is checked
# by its known answer in tests/test_pretrain_methods.py (on one batch its surviving first moments without a
# second moment make the steps after a restart jump, as in the release).
CASES = [
    PretrainCase("relora", "relora", {"seed": 0, "restart_every": 3, "alpha": 1.0, "optimizer_pruning": 1.0},
                 lambda n_in, n_out, r: r * (n_in + n_out)),
    PretrainCase("relora-lora-no-restart", "relora", {"seed": 0, "restart_every": None, "dropout": 0.0, "alpha": 1.0},
                 lambda n_in, n_out, r: r * (n_in + n_out)),
]
