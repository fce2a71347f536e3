"""``lora_pro``: a LoRA adapter meant to be trained by the LoRA-Pro optimizer.

Paper: Wang, Liang, He, Wang & Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
arXiv 2407.18242.

LoRA-Pro changes how LoRA is *optimised*, not what it computes: the layer is exactly
LoRA (``h = W x + s B A x``, ``A`` kaiming-uniform, ``B = 0``, so identity at init; see
:mod:`rankwise.adapters.lora`), and the method lives in the optimizer
:class:`rankwise.optim.lora_pro.LoRAProAdamW`, which replaces the factors' gradients by the
ones whose equivalent update ``s (B g_A + g_B A)`` best approximates the full gradient.

Design: the method is registered here as well so that ``"lora_pro" in rankwise.methods()``
and a set-up names it like any adapter; the hook ``training_optimizer = "lora_pro"``
(declared on :class:`~rankwise.adapters.base.AdapterLayer`, None for other methods) tells the
bench / CLI which optimizer trains it (``rankwise.optim.build(model, layer.training_optimizer,
lr=...)``). Trained with plain AdamW it is plain LoRA. Saved adapters, merges and PEFT
exports are LoRA's (:class:`~rankwise.adapters.lora_family.StandardLoraLayer`).
"""

from __future__ import annotations

from rankwise.adapters.base import ADAPTERS, LINEAR_LIKE
from rankwise.adapters.lora_family import StandardLoraLayer


@ADAPTERS.register(
    "lora_pro",
    family="training_time",
    paper="LoRA-Pro: Are Low-Rank Adapters Properly Optimized?",
    arxiv="2407.18242",
    supports=LINEAR_LIKE,
)
class LoraProLayer(StandardLoraLayer):
    """LoRA (same tensors, init and forward) whose intended optimizer is ``lora_pro``."""

    training_optimizer = "lora_pro"
