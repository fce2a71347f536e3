"""WeLore's fine-tuning path: train only the low-rank components of a compressed model.

Jaiswal et al., "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from
Low-Rank Gradients", arXiv 2407.11239: after WeLore's compression, the matrices that became
two factors (low-rank components, LRC) are fine-tuned and everything else -- the dense N-LRC
matrices, embeddings, norms, head -- stays frozen. Its headline: fine-tuning the LRCs of a
50%-compressed LLaMA-2-7B can match or beat full fine-tuning of the dense model with ~3x the
throughput and ~0.6x the GPU memory (only the factors carry gradients and optimizer state).
The release's recipe: AdamW, cosine to 0.1 x lr, lr 5e-5 (continual) or 1e-4 (downstream),
weight decay 0, 1000 warm-up steps.

:func:`trainable_lrc` sets ``requires_grad`` accordingly (the factors' weights of every
:class:`~rankwise.nn.FactorizedLinear`, biases frozen like every other parameter) and returns
the trainable parameters for the optimizer.
"""

from __future__ import annotations

from torch import nn

from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear


def trainable_lrc(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the factors of the low-rank components; return those factors."""
    components = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    if not components:
        raise RankwiseError("the model has no low-rank components (FactorizedLinear layers); compress it first, "
                            "e.g. rankwise.compress(model, 'welore', ratio=0.5)")
    model.requires_grad_(False)
    trainable = [layer.weight for component in components for layer in (component.down, component.up)]
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable
