"""EoRA compensation (rankwise.compensate) and WeLore's LRC-only fine-tuning (rankwise.compress.trainable_lrc)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise
from conftest import make_batch, make_llama
from rankwise.compress import compensate, compress, trainable_lrc
from rankwise.compress.eora import eora_correction
from rankwise.compress.statistics import collect
from rankwise.compress.whitening import Whitening, weighted_truncation
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight
from rankwise.nn import FactorizedLinear

LAYER = "encoder.layer.0.intermediate.dense"


def output_error(error: torch.Tensor, gram: torch.Tensor) -> float:
    return float(((error @ gram) * error).sum())


def test_eora_reduces_the_output_error_of_an_nf4_quantized_layer(minilm, minilm_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoTokenizer

    from rankwise.compress.evaluation import encoder_batches
    from rankwise.data.corpus import load_corpus
    from test_layers import quantized_copy

    batches = encoder_batches(load_corpus("finetune", "validation")[:30], AutoTokenizer.from_pretrained(minilm_path),
                              seq_len=64, batch_size=4, max_batches=3)
    statistics = collect(minilm, [LAYER], batches, ("input_covariance",))[LAYER].input_covariance
    gram = statistics.second_moment().double()
    layer = minilm.get_submodule(LAYER)
    quantized = quantized_copy(layer, "linear4bit")
    error = layer.weight.detach().double() - dense_weight(quantized).double()
    up, down = eora_correction(error, gram, 32)
    before = output_error(error, gram)
    after = output_error(error - up @ down, gram)
    u, s, vh = torch.linalg.svd(error, full_matrices=False)  # the plain (Frobenius) rank-32 correction
    plain = output_error(error - (u[:, :32] * s[:32]) @ vh[:32], gram)
    assert after < plain < before and after < 0.9 * before
    # the known minimum: the discarded singular values of D Q Lambda^(1/2)
    _, _, sigma = weighted_truncation(error, 1, columns=Whitening.eigen(gram))
    assert after == pytest.approx(float(sigma[32:].square().sum()), rel=1e-6)


def pruned(model: nn.Module, fraction: float = 0.5) -> nn.Module:
    """Magnitude pruning of every targeted Linear (a model of the same shapes with zeros)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                weight = module.weight
                threshold = weight.abs().flatten().kthvalue(int(fraction * weight.numel())).values
                weight[weight.abs() <= threshold] = 0
    return model


def relative_logit_error(model, reference, batch) -> float:
    with torch.no_grad():
        expected = reference(**batch).logits
        return float((model(**batch).logits - expected).norm() / expected.norm())


def test_compensating_a_pruned_model_gives_a_lora_adapter_peft_loads_on_the_pruned_base(tmp_path):
    peft = pytest.importorskip("peft")
    original = make_llama()
    model = pruned(original)
    base_copy = copy.deepcopy(model)
    held_out = make_batch(seed=7)
    before = relative_logit_error(model, original, held_out)
    compensate(model, original, rank=4, data=[make_batch(seed=1), make_batch(seed=2)])
    layers = rankwise.adapters.adapter_layers(model)
    assert len(layers) == 14 and {layer.rank for layer in layers.values()} == {4}
    assert rankwise.trainable_parameters(model) == sum(4 * (l.in_features + l.out_features) for l in layers.values())
    assert relative_logit_error(model, original, held_out) < 0.9 * before
    report = model.rankwise_compensation["layers"]
    assert all(r["relative_output_error_after"] < r["relative_output_error_before"] for r in report.values())
    assert {r["form"] for r in report.values()} == {"lora"}
    exported = rankwise.export_peft(model, tmp_path)
    assert exported["exact"]
    loaded = peft.PeftModel.from_pretrained(base_copy, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**held_out).logits, model(**held_out).logits, rtol=1e-5, atol=1e-5)


def test_compensating_a_factorised_model_joins_the_correction_to_its_factors(tmp_path):
    original = make_llama()
    model = compress(copy.deepcopy(original), "svd", ratio=0.3)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    held_out = make_batch(seed=7)
    before = relative_logit_error(model, original, held_out)
    compensate(model, original, rank=4, data=[make_batch(seed=1), make_batch(seed=2)])
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, FactorizedLinear)} == {
        n: r + 4 for n, r in ranks.items()}
    assert {r["form"] for r in model.rankwise_compensation["layers"].values()} == {"factors"}
    assert relative_logit_error(model, original, held_out) < 0.9 * before
    rankwise.save_compressed(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(rankwise.load_compressed(tmp_path)(**held_out).logits, model(**held_out).logits)


def test_compensating_an_nf4_quantized_model_gives_a_lora_adapter(tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_layers import quantized_copy

    # width 64: bitsandbytes 0.50's CPU inference path (eval + no_grad) repacks 4-bit weights per
    # 64-wide block and fails on layers with fewer than 64 inputs
    original = make_llama(hidden=64)
    model = copy.deepcopy(original)
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, quantized_copy(model.get_submodule(name), "linear4bit"))
    held_out = make_batch(seed=7)
    before = relative_logit_error(model, original, held_out)
    compensate(model, original, rank=4, data=[make_batch(seed=1)],
               targets=["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"])
    assert relative_logit_error(model, original, held_out) < before
    assert rankwise.export_peft(model, tmp_path)["exact"]


def test_compensate_refuses_bad_input_and_leaves_the_model_as_it_was():
    original = make_llama()
    model = pruned(original)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = [make_batch(seed=1)]
    with pytest.raises(RankwiseError, match="is data-driven: pass data="):
        compensate(model, original, rank=4)
    with pytest.raises(RankwiseError, match="rank 40 exceeds min"):
        compensate(model, original, rank=40, data=data)
    with pytest.raises(RankwiseError, match="option rank must be an integer >= 1"):
        compensate(model, original, rank=0, data=data)
    with pytest.raises(RankwiseError, match="unknown compensation method 'gptq'; known: eora"):
        compensate(model, original, "gptq", rank=4, data=data)
    with pytest.raises(RankwiseError, match="no targeted layer of the compressed model differs"):
        compensate(copy.deepcopy(original), original, rank=4, data=data)
    with pytest.raises(RankwiseError, match="does not fit the model"):
        compensate(model, original, rank=4, data=[{"input_ids": torch.tensor([[1, 999]])}])
    assert not rankwise.adapters.adapter_layers(model) and not hasattr(model, "rankwise_compensation")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----- WeLore's fine-tuning of the low-rank components ------------------------------------------


def test_trainable_lrc_trains_only_the_low_rank_components(llama):
    compress(llama, "welore", ratio=0.5)
    components = {n: m for n, m in llama.named_modules() if isinstance(m, FactorizedLinear)}
    assert components
    trainable = trainable_lrc(llama)
    assert {id(p) for p in trainable} == {id(p) for p in llama.parameters() if p.requires_grad} == {
        id(p) for m in components.values() for p in (m.up.weight, m.down.weight)}
    frozen = {n: p.detach().clone() for n, p in llama.named_parameters() if not p.requires_grad}
    factors = {n: p.detach().clone() for n, p in llama.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for seed in range(3):
        optimizer.zero_grad()
        llama(**make_batch(seed=seed)).loss.backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in llama.named_parameters() if n in frozen)
    assert all(not torch.equal(p, factors[n]) for n, p in llama.named_parameters() if n in factors)


def test_trainable_lrc_refuses_a_model_without_low_rank_components(llama):
    with pytest.raises(RankwiseError, match="no low-rank components.*rankwise.compress"):
        trainable_lrc(llama)
    assert all(p.requires_grad for p in llama.parameters())
