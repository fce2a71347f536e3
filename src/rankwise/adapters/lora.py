"""LoRA and rsLoRA.

LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
rsLoRA: Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
arXiv 2312.03732.

The frozen weight ``W`` (``out x in``) is adapted as

    h = W x + s * B A x,     A in R^{r x in},  B in R^{out x r}
    s = alpha / r            (LoRA)
    s = alpha / sqrt(r)      (rsLoRA, ``rslora=True``: keeps the update's scale stable as r grows)

so ``delta_weight() = s * B @ A``. Initialisation: ``A`` kaiming-uniform with ``a = sqrt(5)``
(``U(-1/sqrt(in), 1/sqrt(in))``, nn.Linear's default -- the paper only asks for a random
Gaussian ``A``; this follows the common implementation choice) and ``B = 0``, so the
adapted model equals the base model at init. ``dropout`` is applied to the input of the
adapter path only (as in the paper's code release); the base path never sees it.

The layer is :class:`~rankwise.adapters.lora_family.StandardLoraLayer`, which EVA, LoRA-Pro
and LoRA-GGPO share; tensors are named ``lora_A`` (r x in) and ``lora_B`` (out x r), the
layouts of PEFT's ``lora_A.weight`` / ``lora_B.weight``.
"""

from __future__ import annotations

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.lora_family import StandardLoraLayer


@ADAPTERS.register(
    "lora",
    family="lora",
    paper="LoRA: Low-Rank Adaptation of Large Language Models",
    arxiv="2106.09685",
    supports=LINEAR_LIKE + ("embedding", "conv2d"),
)
class LoraLayer(StandardLoraLayer):
    """``base(x) + s * B A dropout(x)`` with ``s = alpha/r`` (or ``alpha/sqrt(r)`` with rsLoRA)."""
