"""Adapters over quantized bases (QLoRA): every common-suite row on an NF4 base, 8-bit and FP4
bases, lossy merges, LoftQ, and PEFT's QLoRA adapters imported exactly.

Methods that add an update (LoRA and its relatives) must, on a bitsandbytes base: give the
quantized base's output at init (identity rows), put gradients on the adapter only, leave the
base codes untouched (still 4-bit in memory) through training, save / load onto a fresh
quantized base, and refuse a merge unless ``allow_lossy=True``. Methods that rewrite the base
(PiSSA, OLoRA, CorDA, ...) and LoftQ (which quantizes the base itself) need the full-precision
weight: they refuse a quantized base with a message naming the remedy, leaving it untouched.
"""

from __future__ import annotations


import pytest
import torch

import rankwise
from cases import collect
from conftest import make_batch, make_llama
from rankwise.adapters import ADAPTERS, adapt, adapter_layers, export_peft, import_peft, load_adapter, merge, save_adapter
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight
from rankwise.linalg.svd import truncated_svd

bnb = pytest.importorskip("bitsandbytes")

RANK, ALPHA = 4, 8.0
CASES = collect("adapters_")
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def quantized_llama(scheme: str = "nf4"):
    return rankwise.quantize(make_llama(), scheme)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def relative(a, b) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def assert_same_state(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def takes_quantized(case) -> bool:
    entry = ADAPTERS.entry(case.method)
    cls = entry.obj
    rewrites = cls.rewrites_base if isinstance(cls.rewrites_base, bool) else not case.options.get(
        "start_from_update", True)
    return "linear4bit" in entry.supports and not rewrites


@cases
def test_every_method_on_an_nf4_base(case, batch, tmp_path):
    data = [make_batch(seed=1), make_batch(seed=2)] if case.needs_data else None
    model = quantized_llama()
    reference = logits(model, batch)
    if not takes_quantized(case):
        before = snapshot(model)
        with pytest.raises(RankwiseError, match=r"full precision|rankwise.quantize|cannot adapt layer"):
            adapt(model, case.method, rank=RANK, alpha=ALPHA, data=data, **case.options)
        assert_same_state(model, before)
        assert not adapter_layers(model)
        return
    adapt(model, case.method, rank=RANK, alpha=ALPHA, data=data, **case.options)
    out = logits(model, batch)
    if case.identity_at_init:
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    else:
        assert not torch.allclose(out, reference, atol=1e-5)

    layers = adapter_layers(model)
    assert all(layer.quantized and layer.base.weight.dtype == torch.uint8 for layer in layers.values())
    codes = {name: layer.base.weight.data.clone() for name, layer in layers.items()}
    adapter_ids = {id(p) for layer in layers.values() for k, p in layer.named_parameters() if not k.startswith("base.")}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=case.lr)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert (p.grad is not None) == (id(p) in adapter_ids), name
        optimizer.step()
    model.eval()
    for name, layer in layers.items():  # the base stays quantized, byte for byte
        assert layer.base.weight.dtype == torch.uint8 and torch.equal(layer.base.weight.data, codes[name]), name
    trained = logits(model, batch)

    save_adapter(model, tmp_path)
    loaded = load_adapter(quantized_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), trained, atol=1e-5, rtol=0)

    before = snapshot(model)
    with pytest.raises(RankwiseError, match="allow_lossy=True"):
        merge(model)
    assert_same_state(model, before)
    merge(model, allow_lossy=True)
    lossy = logits(model, batch)
    # requantizing the merged weight rounds it to NF4 codes again: the outputs move by about as much
    # as quantizing the full-precision model moved them (measured 10-25% here; docs/real-models.md)
    quantization = relative(reference, logits(make_llama(), batch))
    assert 0 < relative(lossy, trained) < 2.5 * quantization


@pytest.mark.parametrize("scheme", ["fp4", "int8"])
def test_lora_on_fp4_and_int8_bases(scheme, batch, tmp_path):
    model = quantized_llama(scheme)
    reference = logits(model, batch)
    adapt(model, "lora", rank=RANK, alpha=ALPHA)
    torch.testing.assert_close(logits(model, batch), reference, atol=1e-5, rtol=0)
    model.train()
    model(**batch).loss.backward()
    assert all(layer.lora_B.grad is not None for layer in adapter_layers(model).values())
    with pytest.raises(RankwiseError, match="allow_lossy"):
        merge(model)
    perturb_b(model)
    merged = {name: dense_weight(layer.base, torch.float32) + layer.delta_weight().detach()
              for name, layer in adapter_layers(model).items()}
    merge(model, allow_lossy=True)
    for name, layer in adapter_layers(model).items():  # requantized with the layer's own scheme
        if scheme == "int8":
            rows, scales, _ = bnb.functional.int8_vectorwise_quant(merged[name].half())
            expected = rows.float() * scales.float()[:, None] / 127
        else:
            codes, state = bnb.functional.quantize_4bit(merged[name], blocksize=64, compress_statistics=True,
                                                        quant_type=scheme)
            expected = bnb.functional.dequantize_4bit(codes, state)
        # (int8: the same codes; scales / 127 is rounded in another order, hence one ulp)
        torch.testing.assert_close(dense_weight(layer.base), expected, atol=0, rtol=0 if scheme != "int8" else 3e-7)


def perturb_b(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))


def test_lossy_merge_is_the_requantization_of_the_merged_weight(batch):
    """merge(allow_lossy=True) on NF4 = quant(dequant(Q) + delta): bitsandbytes' own quantizer of the merged weight."""
    model = adapt(quantized_llama(), "lora", rank=RANK, alpha=ALPHA)
    perturb_b(model)
    expected = {}
    for name, layer in adapter_layers(model).items():
        merged = dense_weight(layer.base, torch.float32) + layer.delta_weight().detach()
        codes, state = bnb.functional.quantize_4bit(merged, blocksize=64, compress_statistics=True, quant_type="nf4")
        expected[name] = (merged, bnb.functional.dequantize_4bit(codes, state))
    merge(model, allow_lossy=True)
    for name, layer in adapter_layers(model).items():
        exact, requantized = expected[name]
        torch.testing.assert_close(dense_weight(layer.base), requantized, atol=0, rtol=0)
        assert 0 < relative(requantized, exact) < 0.5  # NF4 keeps about 2 significant bits per value


# ----- LoftQ ------------------------------------------------------------------------------------


def test_loftq_one_step_is_the_quantized_base_plus_the_best_fit_of_its_error():
    """LoftQ (arXiv 2310.08659) with T = 1: Q = quant(W), s B A = SVD_r(W - dequant(Q)); known answer
    from bitsandbytes' quantizer and the SVD (PEFT's LoftQ runs on CUDA / XPU only)."""
    fresh = make_llama()
    model = adapt(make_llama(), "loftq", rank=RANK, alpha=ALPHA)
    for name, layer in adapter_layers(model).items():
        weight = fresh.get_submodule(name).weight.detach()
        codes, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(layer.base.weight.data, codes), name
        residual = weight - bnb.functional.dequantize_4bit(codes, state)
        u, s, vh = truncated_svd(residual, RANK)
        torch.testing.assert_close(layer.delta_weight().detach(), (u * s) @ vh, atol=1e-6, rtol=1e-4)


def test_loftq_starts_closer_to_the_full_precision_model_than_qlora_and_improves_with_steps(batch):
    reference = logits(make_llama(), batch)
    errors = {"qlora": (torch.linalg.norm(logits(quantized_llama(), batch) - reference) / torch.linalg.norm(reference))}
    for steps in (1, 3):
        model = adapt(make_llama(), "loftq", rank=RANK, alpha=ALPHA, loftq_iter=steps)
        errors[steps] = torch.linalg.norm(logits(model, batch) - reference) / torch.linalg.norm(reference)
    assert errors[3] < errors[1] < errors["qlora"], errors


def test_loftq_on_a_quantized_base_is_refused():
    model = quantized_llama()
    before = snapshot(model)
    with pytest.raises(RankwiseError, match="loftq cannot adapt layer .* Linear4bit.*methods that take linear4bit"):
        adapt(model, "loftq", rank=RANK)
    assert_same_state(model, before)


# ----- PEFT as the oracle: QLoRA adapters ---------------------------------------------------------


def test_a_peft_qlora_adapter_imports_exactly(batch, tmp_path):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(quantized_llama(), peft.LoraConfig(r=RANK, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    mine = import_peft(quantized_llama(), tmp_path)
    assert all(layer.quantized for layer in adapter_layers(mine).values())
    torch.testing.assert_close(logits(mine, batch), logits(peft_model, batch), atol=1e-5, rtol=0)
    # and back: the rankwise QLoRA export loads in PEFT on the quantized base with the same outputs
    export_peft(mine, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(quantized_llama(), tmp_path / "back")
    torch.testing.assert_close(logits(again, batch), logits(mine, batch), atol=1e-5, rtol=0)
