"""Common-suite rows of the optimizers that train adapters (the model is adapted first).

LoRA-Pro keeps Adam moments of the equivalent gradient in weight space: ``exp_avg`` and
``exp_avg_sq`` of each adapted layer's ``out x in`` shape, and nothing per factor.
"""

from __future__ import annotations

from cases.optimizer_case import FP32, OptimizerCase

CASES = [
    # only the rank-4 adapters of the random tiny LLaMA train: plain LoRA with AdamW reaches 0.90
    # of the first loss in 20 steps, LoRA-Pro 0.93
    OptimizerCase("lora_pro", {}, lambda m, n: 2 * m * n * FP32, adapter="lora_pro", low_rank=False, lr=2e-2,
                  loss_ratio=0.95),
]
