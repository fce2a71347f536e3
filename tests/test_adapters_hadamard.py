"""LoHa: the Hadamard-product update on constructed factors (its rank reaches r^2), the
Khatri-Rao forward, PEFT's LoHa as the oracle (identical outputs) and the export loading in PEFT."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch, make_gpt2, make_llama
from rankwise.adapters import adapt, adapter_layers, export_peft

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def perturbed(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name in FACTORS:
                factor = getattr(layer, name)
                factor.copy_(0.3 * torch.randn(factor.shape, generator=generator, dtype=factor.dtype))
    return model


def test_update_is_the_hadamard_product_and_reaches_rank_r_squared():
    model = perturbed(adapt(make_llama(), "loha", rank=3, alpha=6, targets=["down_proj"]))
    for layer in adapter_layers(model).values():
        w1 = layer.hada_w1_a @ layer.hada_w1_b
        w2 = layer.hada_w2_a @ layer.hada_w2_b
        expected = 2.0 * torch.stack([torch.stack([w1[o, i] * w2[o, i] for i in range(w1.shape[1])])
                                      for o in range(w1.shape[0])])
        torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-6, rtol=0)
        s = torch.linalg.svdvals(layer.delta_weight().detach())
        assert s[8] > 1e-2 * s[0] and s[9] < 1e-5 * s[0]  # rank r^2 = 9 from two rank-3 factors
        up, down = layer.lora_factors()
        torch.testing.assert_close(up @ down, layer.delta_weight().float(), atol=1e-6, rtol=0)


def test_factored_forward_equals_the_dense_update():
    model = perturbed(adapt(make_llama(), "loha", rank=2, targets=["down_proj"]))
    layer = next(iter(adapter_layers(model).values()))
    x = torch.randn(2, 5, layer.in_features)
    dense = x @ layer.delta_weight().detach().T
    layer.delta_weight = None  # r^2 = 4 is cheap: the forward must take the Khatri-Rao factors
    torch.testing.assert_close(layer.adapter_forward(x), dense, atol=1e-6, rtol=0)


def test_outputs_equal_peft_loha_and_the_export_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ours = perturbed(adapt(make_llama(), "loha", rank=4, alpha=8, targets=TARGETS))
    theirs = peft.get_peft_model(make_llama(), peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS)).eval()
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            module = theirs.get_submodule(f"base_model.model.{name}")
            for factor in FACTORS:
                getattr(module, factor)["default"].copy_(getattr(layer, factor))
    batch = make_batch()
    with torch.no_grad():
        expected = theirs(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, atol=ATOL, rtol=0)
    report = export_peft(ours, tmp_path)
    assert report["peft_type"] == "LOHA" and report["exact"]
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=ATOL, rtol=0)


def test_gpt2_conv1d_exports_as_the_exact_rank_r_squared_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model = perturbed(adapt(make_gpt2(), "loha", rank=2, targets=["c_attn"]))
    report = export_peft(model, tmp_path)
    assert report["exact"] and {m["rank"] for m in report["modules"].values()} == {4}
    loaded = peft.PeftModel.from_pretrained(make_gpt2(), tmp_path).eval()
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)
