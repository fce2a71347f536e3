"""``lora_pro``: a LoRA adapter meant to be trained by the LoRA-Pro optimizer.

Paper: Wang, Liang, He, Wang & Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
arXiv 2407.18242.

LoRA-Pro changes how LoRA is *optimised*, not what it computes: the layer is exactly
LoRA (``h = W x + s B A x``, ``A`` kaiming-uniform, ``B = 0``, so identity at init; see
:mod:`rankwise.adapters.lora`), and the method lives in the optimizer
:class:`rankwise.optim.lora_pro.LoRAProAdamW`, which replaces the factors' gradients by the
ones whose equivalent update ``s (B g_A + g_B A)`` best approximates the full gradient.

Design: the method is registered here as well so that ``"lora_pro" in rankwise.methods()``
and a set-up names it like any adapter; the class attribute ``training_optimizer =
"lora_pro"`` tells the bench / CLI which optimizer trains it (``rankwise.optim.build(model,
layer.training_optimizer, lr=...)``). Trained with plain AdamW it is plain LoRA. Saved
adapters, merges and PEFT exports are LoRA's.
"""

from __future__ import annotations

from rankwise.adapters.base import ADAPTERS
from rankwise.adapters.lora import LoraLayer


@ADAPTERS.register(
    "lora_pro",
    family="training_time",
    paper="LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
    arxiv="2407.18242",
)
class LoraProLayer(LoraLayer):
    """LoRA (same tensors, init and forward) whose intended optimizer is ``lora_pro``."""

    #: the rankwise.optim name of the optimizer that implements the method
    training_optimizer = "lora_pro"
