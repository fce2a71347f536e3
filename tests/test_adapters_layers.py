"""Adapters on every layer type: GPT-2's Conv1D, nn.Embedding and nn.Conv2d, with PEFT 0.21 as the
oracle for the layouts (fan_in_fan_out, lora_embedding_A / _B, the k x k then 1 x 1 convolutions),
and the refusal of a layer type a method cannot take."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_batch, make_gpt2, make_llama
from rankwise.adapters import ADAPTERS, adapt, adapter_layers, export_peft, import_peft, load_adapter, merge
from rankwise.adapters import save_adapter, unload, unmerge
from rankwise.adapters.base import LAYER_TYPES
from rankwise.errors import RankwiseError

peft = pytest.importorskip("peft")

RANK, ATOL = 4, 1e-5


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def perturb(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def randomise_peft(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


# ----- GPT-2's Conv1D --------------------------------------------------------------------------


def test_gpt2_lora_exports_to_peft_with_fan_in_fan_out_and_identical_outputs(batch, tmp_path):
    model = perturb(adapt(make_gpt2(), "lora", rank=RANK, alpha=8))
    export_peft(model, tmp_path)
    config = peft.LoraConfig.from_pretrained(tmp_path)
    assert config.fan_in_fan_out
    loaded = peft.PeftModel.from_pretrained(make_gpt2(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)


def test_a_peft_gpt2_adapter_imports_exactly(batch, tmp_path):
    peft_model = peft.get_peft_model(make_gpt2(), peft.LoraConfig(r=RANK, lora_alpha=8, fan_in_fan_out=True,
                                                                  target_modules=["c_attn", "c_fc"]))
    randomise_peft(peft_model).save_pretrained(tmp_path)
    mine = import_peft(make_gpt2(), tmp_path)
    assert {layer.kind for layer in adapter_layers(mine).values()} == {"conv1d"}
    torch.testing.assert_close(logits(mine, batch), logits(peft_model.eval(), batch), atol=ATOL, rtol=0)


def test_gpt2_merge_writes_the_transposed_update_into_conv1d(batch):
    model = perturb(adapt(make_gpt2(), "lora", rank=RANK, alpha=8, targets=["c_attn"]))
    layer = adapter_layers(model)["transformer.h.0.attn.c_attn"]
    before = layer.base.weight.detach().clone()
    expected = logits(model, batch)
    merge(model)
    torch.testing.assert_close(layer.base.weight - before, layer.delta_weight().detach().T, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), expected, atol=ATOL, rtol=0)


# ----- nn.Embedding ----------------------------------------------------------------------------


def test_embedding_lora_is_peft_layout_and_loads_in_peft(batch, tmp_path):
    reference = logits(make_llama(), batch)
    model = adapt(make_llama(), "lora", rank=RANK, alpha=8, targets=["embed_tokens", "q_proj"])
    layer = adapter_layers(model)["model.embed_tokens"]
    assert layer.kind == "embedding" and layer.lora_A.shape == (RANK, 128) and layer.lora_B.shape == (32, RANK)
    assert not layer.lora_A.any() and layer.lora_B.any()  # loralib / PEFT: A = 0, B normal on embeddings
    torch.testing.assert_close(logits(model, batch), reference, atol=ATOL, rtol=0)
    model.train()
    model(**batch).loss.backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.any()
    model.eval()
    perturb(model)
    expected = logits(model, batch)
    report = export_peft(model, tmp_path)
    assert report["exact"]
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    peft_embedding = loaded.get_submodule("base_model.model.model.embed_tokens")
    assert torch.equal(peft_embedding.lora_embedding_A["default"], layer.lora_A.detach())
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(import_peft(make_llama(), tmp_path), batch), expected, atol=ATOL, rtol=0)
    save_adapter(model, tmp_path / "own")
    torch.testing.assert_close(logits(load_adapter(make_llama(), tmp_path / "own"), batch), expected, atol=ATOL,
                               rtol=0)
    merge(model)
    torch.testing.assert_close(logits(model, batch), expected, atol=ATOL, rtol=0)
    unmerge(model)
    torch.testing.assert_close(logits(unload(model), batch), expected, atol=ATOL, rtol=0)


# ----- nn.Conv2d -------------------------------------------------------------------------------


def test_conv2d_lora_matches_peft_both_ways(tmp_path):
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    reference = ConvNet()(x)
    model = adapt(ConvNet(), "lora", rank=RANK, alpha=8, targets=["conv1", "conv2"])
    layer = adapter_layers(model)["conv2"]
    assert layer.kind == "conv2d" and layer.lora_A.shape == (RANK, 8 * 3 * 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, atol=ATOL, rtol=0)
    perturb(model)
    with torch.no_grad():
        expected = model(x)
    export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(ConvNet(), tmp_path)
    peft_conv = loaded.get_submodule("base_model.model.conv2")
    assert peft_conv.lora_A["default"].weight.shape == (RANK, 8, 3, 3)
    assert peft_conv.lora_B["default"].weight.shape == (6, RANK, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(import_peft(ConvNet(), tmp_path)(x), expected, atol=ATOL, rtol=0)
        merge(model)
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)


def test_a_peft_conv2d_adapter_imports_exactly(tmp_path):
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=RANK, lora_alpha=6, target_modules=["conv1", "conv2"]))
    randomise_peft(peft_model).save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(import_peft(ConvNet(), tmp_path)(x), peft_model(x), atol=ATOL, rtol=0)


# ----- a layer type the method cannot take -----------------------------------------------------


@pytest.mark.parametrize(
    "method, model, targets, message",
    [
        ("pissa", make_llama, ["embed_tokens"],
         "pissa cannot adapt layer 'model.embed_tokens': it is a Embedding (torch.nn.Embedding); pissa supports "
         "conv1d, linear; methods that take embedding: lora"),
        ("adalora", ConvNet, ["conv1"], "methods that take conv2d: flora, lora"),
        ("eva", make_llama, ["embed_tokens", "q_proj"], "eva cannot adapt layer 'model.embed_tokens'"),
    ],
)
def test_a_layer_type_a_method_cannot_take_is_refused_before_anything_changes(method, model, targets, message):
    model = model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {k: type(m) for k, m in model.named_modules()}
    data = [make_batch()] if ADAPTERS.entry(method).needs_data else None
    with pytest.raises(RankwiseError) as info:
        adapt(model, method, rank=2, targets=targets, data=data)
    assert message in str(info.value)
    assert {k: type(m) for k, m in model.named_modules()} == types
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_grouped_convolutions_are_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(RankwiseError, match="grouped convolution"):
        adapt(model, "lora", rank=2, targets=["0"])
    assert isinstance(model[0], nn.Conv2d)


def test_every_registration_names_known_layer_kinds():
    for entry in ADAPTERS.entries():
        assert entry.supports and entry.supports <= set(LAYER_TYPES), entry.name
    assert ADAPTERS.entry("lora").supports == set(LAYER_TYPES)
