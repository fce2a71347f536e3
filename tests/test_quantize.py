"""rankwise.quantize: bitsandbytes as the oracle (its own layers, transformers' BitsAndBytesConfig
loading), QPiSSA (quantizing the residual of an adapted model) and the refusals."""

from __future__ import annotations


import pytest
import torch

import rankwise
from conftest import make_gpt2, make_llama
from rankwise.adapters import adapt, adapter_layers, disable_adapter, merge
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight, layer_kind
from rankwise.targets import match_targets

bnb = pytest.importorskip("bitsandbytes")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def relative(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("scheme, kind", [("nf4", "linear4bit"), ("fp4", "linear4bit"), ("int8", "linear8bit")])
def test_quantize_replaces_every_linear_like_layer_with_bitsandbytes_codes(scheme, kind, batch):
    model = make_llama()
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in match_targets(model, "all-linear")}
    reference = logits(model, batch)
    rankwise.quantize(model, scheme)
    for name, weight in originals.items():
        layer = model.get_submodule(name)
        assert layer_kind(layer) == kind and not layer.weight.requires_grad
        if kind == "linear4bit":
            assert layer.weight.quant_type == scheme and layer.weight.compress_statistics  # double quantization
            # bitsandbytes' own quantizer is the oracle for the codes
            codes, _ = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type=scheme)
            assert torch.equal(layer.weight.data, codes)
        else:
            rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.half())
            assert torch.equal(layer.weight.data, rows) and torch.equal(layer.weight.SCB, scales)
    assert layer_kind(model.lm_head) == "linear"  # the head stays, as with "all-linear" in PEFT
    error = relative(logits(model, batch), reference)
    assert 0 < error < {"nf4": 0.3, "fp4": 0.3, "int8": 0.02}[scheme]


def test_quantize_matches_transformers_bitsandbytes_loading_on_cpu(batch, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_llama().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    mine = rankwise.quantize(make_llama(), "nf4")
    for name in match_targets(mine, "all-linear"):
        assert torch.equal(loaded.get_submodule(name).weight.data, mine.get_submodule(name).weight.data), name
    loaded.train(), mine.train()  # bitsandbytes' CPU eval path fails on widths below its block size
    torch.testing.assert_close(logits(loaded, batch), logits(mine, batch), atol=0, rtol=0)
    # adapting the transformers-loaded model works as on rankwise's own quantization
    adapt(loaded, "lora", rank=4)
    loaded.eval()
    torch.testing.assert_close(logits(loaded, batch), logits(mine.eval(), batch), atol=1e-6, rtol=0)


def test_gpt2_conv1d_layers_are_quantized_from_their_transposed_weight(batch):
    model = make_gpt2()
    weight = model.transformer.h[0].attn.c_attn.weight.detach().T.clone()  # Conv1D stores in x out
    rankwise.quantize(model, "nf4")
    layer = model.transformer.h[0].attn.c_attn
    assert layer_kind(layer) == "linear4bit" and (layer.out_features, layer.in_features) == tuple(weight.shape)
    codes, _ = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=True,
                                            quant_type="nf4")
    assert torch.equal(layer.weight.data, codes)
    x = torch.randn(3, weight.shape[1])
    torch.testing.assert_close(layer(x), x @ dense_weight(layer).T + layer.bias, atol=1e-5, rtol=0)


def test_bf16_compute_dtype_and_adapter_dtype(batch):
    model = rankwise.quantize(make_llama(), "nf4", compute_dtype=torch.bfloat16)
    adapt(model, "lora", rank=4)
    layer = adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.dtype == torch.bfloat16 and layer.base.weight.dtype == torch.uint8
    model.train()
    model(**batch).loss.backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.bfloat16


def test_qpissa_quantizing_the_residual_beats_quantizing_the_weight(minilm):
    """PiSSA (arXiv 2404.02948), QPiSSA: the principal part stays in full precision in the adapter
    and the residual is quantized, so Q(W_res) + B A is closer to W than Q(W) -- on pretrained
    weights, whose spectrum decays (the real MiniLM; a random init has no principal part)."""
    import copy

    targets = ["query", "value", "dense"]
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(1000, 20000, (2, 12), generator=generator)}

    def hidden(model):
        with torch.no_grad():
            return model(**inputs).last_hidden_state

    reference = hidden(minilm)
    qlora = rankwise.quantize(copy.deepcopy(minilm), "nf4", targets=targets)
    qpissa = rankwise.quantize(adapt(copy.deepcopy(minilm), "pissa", rank=32, targets=targets), "nf4",
                               targets=targets)
    ratios = []
    for name, layer in adapter_layers(qpissa).items():
        assert layer.quantized
        weight = dense_weight(minilm.get_submodule(name))
        qpissa_error = relative(dense_weight(layer.base) + layer.delta_weight().detach(), weight)
        ratios.append(qpissa_error / relative(dense_weight(qlora.get_submodule(name)), weight))
    assert max(ratios) < 1 and sum(ratios) / len(ratios) < 0.85, ratios  # measured: 0.80 on average
    assert relative(hidden(qpissa), reference) < relative(hidden(qlora), reference)
    # switched off, the rewritten adapter adds its offset back: the base model, up to the residual's codes
    with disable_adapter(qpissa):
        assert relative(hidden(qpissa), reference) < relative(hidden(qlora), reference)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: rankwise.quantize(m, "nf3"), "unknown quantization scheme 'nf3'"),
        (lambda m: rankwise.quantize(m, "nf4", blocksize=48), "option blocksize must be one of"),
        (lambda m: rankwise.quantize(m, "nf4", compute_dtype=torch.int8), "compute_dtype must be"),
        (lambda m: rankwise.quantize(m, "nf4", targets=["nothing"]), "matched no"),
        (lambda m: rankwise.quantize(m, "nf4", targets=["embed_tokens"]), "cannot quantize 'model.embed_tokens'"),
    ],
)
def test_bad_quantize_calls_leave_the_model(call, message):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError) as info:
        call(model)
    assert message in str(info.value)
    assert {k: type(m) for k, m in model.named_modules()} == {k: type(m) for k, m in make_llama().named_modules()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_tied_or_merged_layers_are_refused():
    gpt2 = make_gpt2()
    with pytest.raises(RankwiseError, match="tied to another module"):
        rankwise.quantize(gpt2, "nf4", targets=["lm_head"])
    model = merge(adapt(make_llama(), "lora", rank=4))
    with pytest.raises(RankwiseError, match="merged adapter.*unmerge"):
        rankwise.quantize(model, "nf4")
    assert not any(layer.quantized for layer in adapter_layers(model).values())
