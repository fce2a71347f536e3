"""DoRA: the paper's decomposition on a constructed weight, PEFT's ``use_dora`` LoRA as the oracle
(identical outputs and gradients -- the norm is a constant in the backward pass in both), the
export loading in PEFT, and unmerge recovering the original weight."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch, make_llama
from rankwise.adapters import adapt, adapter_layers, export_peft, merge, unmerge

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def perturbed_dora(seed=0, **options):
    model = adapt(make_llama(), "dora", rank=4, alpha=8, targets=TARGETS, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))
            layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude.shape, generator=generator))
    return model


def peft_dora(ours, **config):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                target_modules=TARGETS, **config))
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            module = theirs.get_submodule(f"base_model.model.{name}")
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
            module.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return theirs


def test_merged_weight_is_magnitude_times_the_normalised_direction():
    model = perturbed_dora()
    for layer in adapter_layers(model).values():
        weight = layer.base_weight()
        directed = weight + layer.scaling * (layer.lora_B @ layer.lora_A).detach()
        expected = layer.lora_magnitude.detach()[:, None] * directed / directed.norm(dim=1, keepdim=True)
        torch.testing.assert_close(weight + layer.delta_weight().detach(), expected, atol=1e-6, rtol=0)
    merge(model)
    for name, layer in adapter_layers(model).items():
        # every output row of W' has norm m, and unmerge gives back W
        torch.testing.assert_close(layer.base_weight().norm(dim=1), layer.lora_magnitude.detach(), atol=1e-5, rtol=0)
    unmerge(model)
    fresh = make_llama()
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.base.weight, fresh.get_submodule(name).weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_gradients_equal_peft_dora(rslora):
    ours = perturbed_dora(rslora=rslora)
    theirs = peft_dora(ours, use_rslora=rslora)
    batch = make_batch()
    ours.train(), theirs.train()
    ours_out, theirs_out = ours(**batch), theirs(**batch)
    torch.testing.assert_close(ours_out.logits, theirs_out.logits, atol=ATOL, rtol=0)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    for name, layer in adapter_layers(ours).items():
        module = theirs.get_submodule(f"base_model.model.{name}")
        for mine, peft_param in ((layer.lora_A, module.lora_A["default"].weight),
                                 (layer.lora_B, module.lora_B["default"].weight),
                                 (layer.lora_magnitude, module.lora_magnitude_vector["default"].weight)):
            torch.testing.assert_close(mine.grad, peft_param.grad, atol=1e-6, rtol=1e-4)


def test_export_is_peft_dora_and_loads_with_identical_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    ours = perturbed_dora().eval()
    report = export_peft(ours, tmp_path)
    assert report["peft_type"] == "LORA" and report["exact"]
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    assert loaded.peft_config["default"].use_dora
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, atol=ATOL, rtol=0)
