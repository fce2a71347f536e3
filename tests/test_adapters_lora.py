"""LoRA / rsLoRA specifics: the paper's formulas, PEFT as an output oracle, real MiniLM encoder."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_llama
from rankwise.adapters import adapt, adapter_layers, load_adapter, merge, save_adapter, trainable_parameters, unmerge

ATOL = 1e-5


def randomise_b(model, seed=0):
    """B = 0 at init makes every output identity trivial; give B random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)


def test_init_is_kaiming_uniform_a_and_zero_b(llama):
    torch.manual_seed(0)
    adapt(llama, "lora", rank=8, targets=["gate_proj", "down_proj"])
    for layer in adapter_layers(llama).values():
        bound = 1 / math.sqrt(layer.in_features)  # kaiming-uniform(a=sqrt 5) bound
        assert layer.lora_A.shape == (8, layer.in_features) and layer.lora_B.shape == (layer.out_features, 8)
        assert layer.lora_A.abs().max() <= bound
        assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.2 * bound
        assert torch.count_nonzero(layer.lora_B) == 0


@pytest.mark.parametrize("rslora, expected_scaling", [(False, 16 / 4), (True, 16 / 2)])
def test_delta_weight_is_scaled_b_times_a(llama, rslora, expected_scaling):
    adapt(llama, "lora", rank=4, alpha=16, rslora=rslora, targets=["q_proj"])
    randomise_b(llama)
    for layer in adapter_layers(llama).values():
        assert layer.scaling == expected_scaling
        torch.testing.assert_close(layer.delta_weight(), expected_scaling * layer.lora_B @ layer.lora_A)
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T, atol=ATOL, rtol=0)


def test_alpha_defaults_to_rank(llama):
    adapt(llama, "lora", rank=4, targets=["q_proj"])
    assert all(layer.scaling == 1.0 for layer in adapter_layers(llama).values())


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_with_the_same_factors(batch, rslora):
    peft = pytest.importorskip("peft")
    ours = adapt(make_llama(), "lora", rank=4, alpha=8, rslora=rslora, targets=["q_proj", "v_proj", "down_proj"])
    randomise_b(ours)
    reference = peft.get_peft_model(
        make_llama(),
        peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    state = reference.state_dict()
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            state[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
            state[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
        expected = reference(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, atol=ATOL, rtol=0)
    assert trainable_parameters(ours) == sum(p.numel() for p in reference.parameters() if p.requires_grad)


def test_dropout_applies_to_the_adapter_input_only(llama):
    adapt(llama, "lora", rank=4, dropout=0.5, targets=["q_proj"])
    randomise_b(llama)
    layer = next(iter(adapter_layers(llama).values()))
    layer.train()
    x = torch.randn(5, layer.in_features)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, layer.base(x) + dropped @ layer.delta_weight().T, atol=ATOL, rtol=0)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T, atol=ATOL, rtol=0)


def test_bf16_model_keeps_its_dtype_and_merges_in_fp32(batch):
    model = make_llama().to(torch.bfloat16)
    adapt(model, "lora", rank=4, targets=["q_proj", "v_proj"])
    randomise_b(model)
    layer = next(iter(adapter_layers(model).values()))
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    weight_before = layer.base.weight.detach().clone()
    expected = (weight_before.float() + layer.delta_weight().float()).to(torch.bfloat16)
    merge(model)
    assert layer.base.weight.dtype == torch.bfloat16
    assert torch.equal(layer.base.weight, expected)
    unmerge(model)
    assert model(**batch).logits.dtype == torch.bfloat16


def minilm_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (2, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_minilm_query_value_merge_and_save_load(minilm, minilm_path, tmp_path):
    from transformers import AutoModel

    pristine = copy.deepcopy(minilm)
    inputs = minilm_inputs()
    adapt(minilm, "lora", rank=4, alpha=8, targets=["query", "value"])
    layers = adapter_layers(minilm)
    assert len(layers) == 12 and all(n.endswith((".query", ".value")) for n in layers)
    assert trainable_parameters(minilm) == 12 * 4 * (384 + 384)
    with torch.no_grad():
        torch.testing.assert_close(
            minilm(**inputs).last_hidden_state, pristine(**inputs).last_hidden_state, atol=ATOL, rtol=0
        )
        randomise_b(minilm)
        expected = minilm(**inputs).last_hidden_state
        assert not torch.allclose(expected, pristine(**inputs).last_hidden_state, atol=1e-3)
        merge(minilm)
        torch.testing.assert_close(minilm(**inputs).last_hidden_state, expected, atol=ATOL, rtol=0)
        unmerge(minilm)
        save_adapter(minilm, tmp_path)
        fresh = AutoModel.from_pretrained(minilm_path).eval()
        loaded = load_adapter(fresh, tmp_path)
        torch.testing.assert_close(loaded(**inputs).last_hidden_state, expected, atol=ATOL, rtol=0)
