"""rankwise.layers: every Linear-like layer seen as the same out x in matrix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.layers import compute_dtype, dense_weight, features, is_linear_like, is_quantized, layer_kind


def quantized_copy(linear: nn.Linear, kind: str) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    if kind == "linear4bit":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, quant_type="nf4",
                                  compress_statistics=True, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = linear.bias
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("kind", ["linear4bit", "linear8bit"])
def test_quantized_layers_forward_as_their_dense_weight(kind):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = quantized_copy(linear, kind)
    x = torch.randn(7, 64)
    weight = dense_weight(layer)
    assert layer_kind(layer) == kind and is_linear_like(layer) and is_quantized(layer)
    assert features(layer) == (48, 64) and weight.shape == (48, 64) and compute_dtype(layer) == torch.float32
    # bitsandbytes' own forward is the oracle: the dense view must be the matrix it multiplies by
    torch.testing.assert_close(x @ weight.T + layer.bias, layer(x), rtol=1e-5, atol=1e-5)
    # and a quantization of the original weight: NF4 error ~ a tenth of the weights' scale, int8 ~ 1/127
    bound = {"linear4bit": 0.25, "linear8bit": 1.0 / 100}[kind] * linear.weight.abs().max()
    assert (weight - linear.weight).abs().max() < bound
    assert (weight - linear.weight).abs().max() > 0  # really quantized


def test_conv1d_is_seen_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs, weight stored 16 x 24
    x = torch.randn(5, 16)
    assert layer_kind(layer) == "conv1d" and features(layer) == (24, 16) and not is_quantized(layer)
    torch.testing.assert_close(x @ dense_weight(layer).T + layer.bias, layer(x))


def test_plain_layers_and_refusals():
    linear = nn.Linear(8, 4)
    assert layer_kind(linear) == "linear" and dense_weight(linear).data_ptr() == linear.weight.data_ptr()
    assert dense_weight(linear, torch.float64).dtype == torch.float64
    assert layer_kind(nn.Embedding(10, 4)) == "embedding" and layer_kind(nn.Conv2d(3, 4, 3)) == "conv2d"
    assert not is_linear_like(nn.Embedding(10, 4)) and layer_kind(nn.ReLU()) is None
    with pytest.raises(RankwiseError, match="not a Linear-like layer"):
        features(nn.ReLU())


def test_all_linear_means_every_linear_like_layer_but_the_head(gpt2, llama):
    from rankwise.targets import match_targets

    names = match_targets(gpt2, "all-linear")
    # GPT-2: four Conv1D layers per block (fused q/k/v, attention out, MLP in, MLP out); the
    # head is tied to the token embedding and left out, as in PEFT
    assert names == [f"transformer.h.{i}.{leaf}" for i in range(2)
                     for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert "lm_head" not in match_targets(llama, "all-linear") and len(match_targets(llama, "all-linear")) == 14
    assert match_targets(gpt2, ["c_attn"], kind=None) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(RankwiseError, match="matched no Linear module"):
        match_targets(gpt2, "all-linear", kind=nn.Linear)  # GPT-2's only nn.Linear is its head
