"""``rankwise.densify``: a compressed, parametrised or adapted model back to a plain Hugging Face model.

Whatever rankwise put into a model, ``densify(model)`` replaces it, in place, by the plain
modules transformers builds, computing the same function (up to the rounding of forming
the dense products in the weights' dtype), so ``model.save_pretrained`` /
``from_pretrained`` work as for any HF model:

- adapters (``rankwise.adapt``, merged or not) are folded into their base weights and
  removed (``rankwise.adapters.unload``);
- a module with ``to_dense_module()`` (MoDeGPT's structured attention and MLP) is replaced
  by the plain module it returns;
- any other module exposing ``dense_weight()`` (the ``out x in`` matrix it applies) and
  ``bias`` -- :class:`~rankwise.nn.FactorizedLinear`, the pretraining parametrisations -- is
  replaced by ``nn.Linear`` with that weight and bias, or by transformers' ``Conv1D`` (weight
  stored ``in x out``) when the module's ``source_kind`` is ``"conv1d"``.

``model.rankwise_compression`` is removed: the model is no longer compressed.
"""

from __future__ import annotations

import torch
from torch import nn

from rankwise.layers import Conv1D
from rankwise.targets import replace_module


def _dense_layer(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        weight = module.dense_weight().detach()
        bias = module.bias
        out_features, in_features = weight.shape
        trainable = any(p.requires_grad for p in module.parameters())
        if getattr(module, "source_kind", "linear") == "conv1d":
            layer = Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
            layer.weight.copy_(weight.T)
            layer.bias.copy_(bias if bias is not None else torch.zeros_like(layer.bias))
        else:
            layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device,
                              dtype=weight.dtype)
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    layer.requires_grad_(trainable)
    return layer.train(module.training)


def densify(model: nn.Module) -> nn.Module:
    """Replace every rankwise module of ``model`` by the plain module computing the same map; return ``model``."""
    from rankwise.adapters import adapter_layers, unload

    if adapter_layers(model):
        model = unload(model)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(parent + ".") for parent in replaced):
            continue
        if callable(getattr(module, "to_dense_module", None)):
            replace_module(model, name, module.to_dense_module())
        elif callable(getattr(module, "dense_weight", None)) and hasattr(module, "bias"):
            replace_module(model, name, _dense_layer(module))
        else:
            continue
        replaced.append(name)
    if hasattr(model, "rankwise_compression"):
        del model.rankwise_compression
    return model
