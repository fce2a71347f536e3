from cases.optimizer_case import OptimizerCase, galore_weight_bytes, torch_adamw_bytes

CASES = [
    OptimizerCase(
        "adamw", {"weight_decay": 0.0}, lambda m, n: torch_adamw_bytes(m * n), torch_adamw_bytes, low_rank=False
    ),
    OptimizerCase("galore", {"rank": 8, "update_proj_gap": 2}, lambda m, n: galore_weight_bytes(m, n, 8)),
    OptimizerCase(
        "galore",
        {"rank": 4, "update_proj_gap": 2, "moment_policy": "rotate"},
        lambda m, n: galore_weight_bytes(m, n, 4),
    ),
]
