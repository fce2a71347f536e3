"""Compression: the common suite of every registered method (tiny LLaMA, GPT-2's Conv1D, MiniLM), exact
SVD truncation identities, the ratio contract and the storage rule, save/load, densify, bad input."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from torch import nn

from cases import collect
from conftest import make_batch, make_llama, register_for_test
from rankwise.compress import (
    COMPRESSORS,
    compress,
    load_compressed,
    method_options,
    plan_ranks,
    rank_for_ratio,
    save_compressed,
)
from rankwise.compress.svd import SVDCompressor
from rankwise.densify import densify
from rankwise.errors import RankwiseError
from rankwise.linalg import svd
from rankwise.nn import FactorizedLinear

CASES = collect("compress_")
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
PER_LAYER = [c for c in CASES if COMPRESSORS.entry(c.method).family != "structured"]
per_layer_cases = pytest.mark.parametrize("case", PER_LAYER, ids=[c.id for c in PER_LAYER])


@pytest.fixture(scope="module")
def minilm_once(minilm_path):
    """The real MiniLM, loaded once for this module; tests that mutate it take a deepcopy."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path).eval()


def matrix_with_spectrum(singular_values: list[float], out_features: int, in_features: int, seed: int = 0):
    """``Q1 diag(s) Q2^T`` in float64 with orthonormal random Q1, Q2."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    q1, _ = torch.linalg.qr(torch.randn(out_features, k, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(in_features, k, generator=gen, dtype=torch.float64))
    return q1 @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ q2.T


def single_layer(weight: torch.Tensor, bias: bool = True) -> nn.Sequential:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before) -> None:
    kinds, state = before
    assert [type(m).__name__ for m in model.modules()] == kinds
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def data_for(case, vocab_size: int = 128) -> list[dict] | None:
    return [make_batch(seed=1, vocab_size=vocab_size), make_batch(seed=2, vocab_size=vocab_size)] if case.needs_data \
        else None


def linear_weights(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def rankwise_modules(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("rankwise")]


# ---------------------------------------------------------------- the common suite: every registered method


def test_every_registered_compressor_has_a_row():
    missing = set(COMPRESSORS.names()) - {c.method for c in CASES}
    assert not missing, f"compression methods without a row in tests/cases/compress_*.py: {sorted(missing)}"


@cases
def test_registry_metadata_matches_the_method(case, llama):
    entry = COMPRESSORS.entry(case.method)
    assert entry.needs_data == bool(entry.obj.calibration) == case.needs_data
    assert set(method_options(case.method)) >= set(case.options)
    if case.needs_data:
        before = snapshot(llama)
        with pytest.raises(RankwiseError, match="data-driven"):
            compress(llama, case.method, ratio=0.5, **case.options)
        assert_unchanged(llama, before)


@per_layer_cases
def test_weight_error_is_at_least_the_optimum_and_within_the_rows_bound(case):
    """Eckart-Young: no rank-k factorisation beats the truncated SVD in Frobenius norm."""
    model = make_llama().double()
    target = "model.layers.0.self_attn.q_proj"
    spectrum = [10.0 * 0.7**i for i in range(32)]
    weight = matrix_with_spectrum(spectrum, 32, 32, seed=3)
    with torch.no_grad():
        model.get_submodule(target).weight.copy_(weight)
    compress(model, case.method, ratio=0.4, targets=[target], data=data_for(case), allocation="uniform",
             keep_dense_above=None, **case.options)
    layer = model.get_submodule(target)
    k = rank_for_ratio(32, 32, 0.4)
    assert layer.rank == k == 6
    error = (weight - layer.dense_weight().detach()).norm().item()
    optimum = math.sqrt(sum(s * s for s in spectrum[k:]))
    assert error >= optimum * (1 - 1e-9)
    if case.weight_error_factor is not None:
        assert error <= optimum * case.weight_error_factor


@cases
@pytest.mark.parametrize("ratio", [0.25, 0.77])
def test_the_plan_is_carried_out_and_bookkept(case, ratio):
    model = make_llama()
    data = data_for(case)
    plan = plan_ranks(model, ratio, method=case.method, data=data, keep_dense_above=None, **case.options)
    originals = dict(model.named_modules())
    compress(model, case.method, ratio=ratio, data=data, keep_dense_above=None, **case.options)
    summary = model.rankwise_compression
    for name, planned in plan.layers.items():
        module = model.get_submodule(name)
        if planned.storage == "factorized":
            assert isinstance(module, FactorizedLinear) and module.rank == planned.rank
            assert planned.kept_parameters == planned.rank * (module.in_features + module.out_features)
        elif planned.storage == "untouched":
            assert module is originals[name]
        else:
            assert planned.storage == "structured" and type(module).__name__.startswith("Compressed")
            assert planned.kept_parameters == sum(p.numel() for n, p in module.named_parameters()
                                                   if n.endswith("weight"))
        assert summary["layers"][name]["kept_parameters"] == planned.kept_parameters
    assert summary["method"] == case.method and summary["requested_ratio"] == ratio
    assert summary["kept_parameters"] == sum(p.kept_parameters for p in plan.layers.values())
    assert summary["dense_parameters"] == sum(p.dense_parameters for p in plan.layers.values())
    assert summary["realised_ratio"] == pytest.approx(summary["kept_parameters"] / summary["dense_parameters"])
    assert summary["realised_ratio"] <= ratio and summary["ranks"] == plan.ranks


@per_layer_cases
def test_weights_of_low_rank_are_reproduced_exactly(case):
    """Every targeted weight has rank 4 and every kept rank is >= 4: nothing is lost."""
    model = make_llama().double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in linear_weights(model).values():
            layer.weight.copy_(torch.randn(layer.out_features, 4, generator=gen, dtype=torch.float64)
                               @ torch.randn(4, layer.in_features, generator=gen, dtype=torch.float64) / 8)
    batch = make_batch()
    with torch.no_grad():
        reference = model(**batch).logits
    compress(model, case.method, ratio=0.95, data=data_for(case), keep_dense_above=None, **case.options)
    ranks = [m.rank for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert ranks and min(ranks) >= 4
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=1e-9)


@cases
def test_compressed_model_round_trips_through_save_and_load(case, tmp_path):
    model = compress(make_llama(), case.method, ratio=0.4, data=data_for(case), **case.options)
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    assert type(loaded) is type(model) and rankwise_modules(loaded) == rankwise_modules(model)
    assert loaded.rankwise_compression == json.loads(json.dumps(model.rankwise_compression))
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


@cases
def test_bf16_model_keeps_its_dtype(case):
    model = compress(make_llama().to(torch.bfloat16), case.method, ratio=0.5, data=data_for(case), **case.options)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(model(**make_batch()).logits).all()


@cases
def test_unknown_options_and_bad_ratios_leave_the_model_untouched(case, llama):
    before = snapshot(llama)
    accepted = ", ".join(f"{k}={o.default!r}" for k, o in sorted(method_options(case.method).items()))
    with pytest.raises(RankwiseError, match=rf"unknown option\(s\) colour; it accepts: {re.escape(accepted)}"):
        compress(llama, case.method, ratio=0.5, data=data_for(case), colour="red", **case.options)
    with pytest.raises(RankwiseError, match=r"ratio must be a number in \(0, 1\)"):
        compress(llama, case.method, ratio=1.0, data=data_for(case), **case.options)
    assert_unchanged(llama, before)
    assert not hasattr(llama, "rankwise_compression")


@cases
def test_densify_gives_back_a_plain_hf_model_with_the_same_outputs(case, tmp_path):
    from transformers import AutoModelForCausalLM

    model = compress(make_llama(), case.method, ratio=0.5, data=data_for(case), **case.options)
    batch = make_batch()
    with torch.no_grad():
        compressed = model(**batch).logits
    plain = densify(model)
    assert rankwise_modules(plain) == [] and not hasattr(plain, "rankwise_compression")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, compressed, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, plain(**batch).logits)


@per_layer_cases
def test_gpt2_conv1d_layers_are_compressed_saved_and_densified(case, gpt2, tmp_path):
    from transformers.pytorch_utils import Conv1D

    batch = make_batch()
    model = compress(gpt2, case.method, ratio=0.5, data=data_for(case), keep_dense_above=None, **case.options)
    summary = model.rankwise_compression
    assert len(summary["layers"]) == 8 and {layer["kind"] for layer in summary["layers"].values()} == {"conv1d"}
    assert {m.source_kind for m in model.modules() if isinstance(m, FactorizedLinear)} == {"conv1d"}
    with torch.no_grad():
        compressed = model(**batch).logits
    save_compressed(model, tmp_path)
    loaded = load_compressed(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # the tie survives the meta-device load
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, compressed)
    plain = densify(loaded)
    assert sum(isinstance(m, Conv1D) for m in plain.modules()) == 8 and rankwise_modules(plain) == []
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, compressed, rtol=1e-5, atol=1e-5)


def encoder_batches(minilm_path, count: int = 2) -> list[dict]:
    from transformers import AutoTokenizer

    from rankwise.compress.evaluation import encoder_batches as build
    from rankwise.data.corpus import load_corpus

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return build(load_corpus("finetune", "validation")[:20], tokenizer, seq_len=32, batch_size=4, max_batches=count)


@per_layer_cases
def test_every_method_compresses_the_real_minilm(case, minilm_once, minilm_path):
    from rankwise.compress.evaluation import contrastive_loss, hidden_fidelity, hidden_states

    batches = encoder_batches(minilm_path)
    targets = r"encoder\.layer\.0\..*"
    model = copy.deepcopy(minilm_once)
    loss_fn = contrastive_loss if case.method == "fwsvd" else None
    compress(model, case.method, ratio=0.5, targets=targets, data=batches if case.needs_data else None,
             loss_fn=loss_fn, keep_dense_above=None, **case.options)
    factorised = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert factorised and all(n.startswith("encoder.layer.0.") for n in factorised)
    fidelity = hidden_fidelity(model, batches, hidden_states(minilm_once, batches))
    assert 0.0 < fidelity < 1.0
    plain = densify(copy.deepcopy(model))
    assert hidden_fidelity(plain, batches, hidden_states(model, batches)) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- exact truncation identities


@pytest.mark.parametrize(
    "shape, ratio",
    [((40, 24), 0.5), ((24, 40), 0.3), ((32, 32), 0.8), ((64, 16), 0.9)],
)
def test_svd_error_equals_discarded_singular_values(shape, ratio):
    m, n = shape
    spectrum = [float(2.0 ** (-i / 3)) * 10 for i in range(min(m, n))]
    weight = matrix_with_spectrum(spectrum, m, n)
    model = single_layer(weight)
    bias = model[0].bias.detach().clone()
    compress(model, "svd", ratio=ratio, keep_dense_above=None)
    layer = model[0]
    k = rank_for_ratio(m, n, ratio)
    assert isinstance(layer, FactorizedLinear) and layer.rank == k == math.floor(ratio * m * n / (m + n))
    residual = weight - layer.dense_weight().detach()
    discarded = torch.tensor(spectrum[k:], dtype=torch.float64)
    assert torch.allclose(residual.pow(2).sum(), discarded.pow(2).sum(), rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_norm(residual, ord=2).item() == pytest.approx(spectrum[k], rel=1e-10)
    assert torch.equal(layer.bias.detach(), bias)
    # balanced split: both factors carry sum of the kept singular values in Frobenius norm^2
    kept = sum(spectrum[:k])
    assert layer.up.weight.pow(2).sum().item() == pytest.approx(kept, rel=1e-10)
    assert layer.down.weight.pow(2).sum().item() == pytest.approx(kept, rel=1e-10)


def test_svd_error_on_real_minilm_layer(minilm_once):
    minilm = copy.deepcopy(minilm_once)
    name = "encoder.layer.0.attention.self.query"
    weight = minilm.get_submodule(name).weight.detach().clone()
    compress(minilm, "svd", ratio=0.5, targets=[name])
    layer = minilm.get_submodule(name)
    _, s, _ = svd(weight, dtype=torch.float64)
    k = layer.rank
    assert k == 96  # floor(0.5 * 384 * 384 / 768)
    residual = weight.double() - layer.dense_weight().detach().double()
    assert residual.pow(2).sum().item() == pytest.approx(s[k:].pow(2).sum().item(), rel=1e-4)
    assert torch.linalg.matrix_norm(residual, ord=2).item() == pytest.approx(s[k].item(), rel=1e-4)
    # only the named layer was replaced
    assert sum(isinstance(m, FactorizedLinear) for m in minilm.modules()) == 1


def test_randomized_svd_is_seeded_and_is_not_the_exact_svd():
    weight = matrix_with_spectrum([10.0 * 0.7**i for i in range(30)], 60, 30)

    def factors(**options):
        layer = compress(single_layer(weight), "svd", ratio=0.4, **options)[0]
        return torch.cat([layer.up.weight.detach().flatten(), layer.down.weight.detach().flatten()])

    first, again, other_seed, exact = factors(niter=2, seed=1), factors(niter=2, seed=1), factors(niter=2, seed=2), factors()
    assert torch.equal(first, again)
    # a different sketch or the exact SVD differ beyond float64 rounding
    assert (first - other_seed).abs().max() > 1e-9 and (first - exact).abs().max() > 1e-9


# ---------------------------------------------------------------- the ratio contract and the storage rule


def test_uniform_ranks_meet_the_ratio_within_one_rank_step_per_layer(minilm_once):
    for ratio in (0.9, 0.7, 0.5, 0.2):
        plan = plan_ranks(minilm_once, ratio, keep_dense_above=None)
        for name, layer in plan.layers.items():
            m, n = layer.shape
            assert layer.rank * (m + n) <= ratio * m * n < (layer.rank + 1) * (m + n), name
        assert plan.realised_ratio <= ratio


def test_plan_ranks_changes_nothing_and_matches_compress(minilm_once):
    minilm = minilm_once
    before = snapshot(minilm)
    plan = plan_ranks(minilm, 0.6)
    assert_unchanged(minilm, before)
    assert plan.realised_ratio <= 0.6 and len(plan.layers) == 6 * 6 + 1  # six blocks of six, the pooler
    assert plan.ranks["encoder.layer.0.intermediate.dense"] == math.floor(0.6 * 1536 * 384 / 1920)


def test_layers_above_the_speed_break_even_keep_a_dense_rank_k_weight():
    """At ratio 0.95 the rank is above 0.9 m n / (m + n): the layer stays nn.Linear with the rank-k product."""
    spectrum = [float(0.9 ** i) for i in range(24)]
    weight = matrix_with_spectrum(spectrum, 40, 24)
    model = compress(single_layer(weight), "svd", ratio=0.95, keep_dense_above=0.9)
    layer = model[0]
    k = rank_for_ratio(40, 24, 0.95)
    assert type(layer) is nn.Linear and torch.linalg.matrix_rank(layer.weight.detach()).item() == k
    residual = (weight - layer.weight.detach()).pow(2).sum().item()
    assert residual == pytest.approx(sum(s * s for s in spectrum[k:]), rel=1e-9)
    summary = model.rankwise_compression
    assert summary["layers"]["0"]["storage"] == "dense" and summary["realised_ratio"] == 1.0
    # the same request with the rule off factorises (fewer weights, slower forward)
    factorised = compress(single_layer(weight), "svd", ratio=0.95, keep_dense_above=None)
    assert isinstance(factorised[0], FactorizedLinear) and factorised.rankwise_compression["realised_ratio"] <= 0.95
    # below the break-even the default rule factorises
    assert isinstance(compress(single_layer(weight), "svd", ratio=0.8)[0], FactorizedLinear)


def test_outputs_error_shrinks_as_ratio_grows_on_minilm(minilm_once):
    ids = torch.tensor([[101, 2659, 4635, 4725, 2191, 2731, 10036, 1012, 102]])
    with torch.no_grad():
        reference = minilm_once(input_ids=ids).last_hidden_state
    errors = []
    for ratio in (0.3, 0.6, 0.95):
        model = copy.deepcopy(minilm_once)
        compress(model, "svd", ratio=ratio, targets=r"encoder\.layer\.0\.attention\.self\.(query|key|value)",
                 keep_dense_above=None)
        with torch.no_grad():
            out = model(input_ids=ids).last_hidden_state
        errors.append(((out - reference).norm() / reference.norm()).item())
    assert errors[0] > errors[1] > errors[2] > 0


def test_bf16_model_compresses_in_fp32_and_keeps_dtype(llama, batch):
    model_bf16 = copy.deepcopy(llama).to(torch.bfloat16)
    model_fp32 = copy.deepcopy(model_bf16).float()
    compress(model_bf16, "svd", ratio=0.5)
    compress(model_fp32, "svd", ratio=0.5)
    layer_bf16 = model_bf16.model.layers[0].mlp.down_proj
    layer_fp32 = model_fp32.model.layers[0].mlp.down_proj
    assert layer_bf16.up.weight.dtype == torch.bfloat16 == layer_bf16.down.weight.dtype
    # the SVD ran in fp32 on the same numbers: the bf16 factors are the fp32 ones rounded
    assert torch.equal(layer_bf16.up.weight, layer_fp32.up.weight.to(torch.bfloat16))
    assert torch.equal(layer_bf16.down.weight, layer_fp32.down.weight.to(torch.bfloat16))
    loss = model_bf16(**batch).loss
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- errors leave the model untouched


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="svd", ratio=0.0), r"ratio must be a number in \(0, 1\), got 0.0"),
        (dict(method="svd", ratio=1.0), r"ratio must be a number in \(0, 1\)"),
        (dict(method="svd", ratio=-0.2), r"ratio must be a number in \(0, 1\)"),
        (dict(method="svd", ratio=True), r"ratio must be a number in \(0, 1\), got True"),
        (dict(method="svd", ratio="0.5"), r"ratio must be a number in \(0, 1\), got '0.5'"),
        (dict(method="svd", ratio=0.01), "rank-1 factorisation"),
        (dict(method="tucker", ratio=0.5), "unknown compression method 'tucker'; known: .*svd"),
        (dict(method="svd", ratio=0.5, targets=["nonexistent"]), "matched no Linear"),
        (dict(method="svd", ratio=0.5, rank=3), r"'svd': unknown option\(s\) rank; it accepts: niter=None, seed=0"),
        (dict(method="svd", ratio=0.5, niter=-1), "option niter must be None or an integer >= 0, got -1"),
        (dict(method="svd", ratio=0.5, seed=1.5), "option seed must be an integer, got 1.5"),
        (dict(method="svd", ratio=0.5, allocation="greedy"), "option allocation must be None or one of 'uniform'"),
        (dict(method="svd", ratio=0.5, allocation="sensitivity"), "allocation 'sensitivity' measures each layer's loss"),
        (dict(method="modegpt", ratio=0.5, allocation="welore", data=[make_batch()]),
         "'modegpt' takes allocation 'uniform', not 'welore'"),
        (dict(method="svd", ratio=0.5, keep_dense_above=0), "keep_dense_above must be None or a number > 0"),
        (dict(method="welore", ratio=0.5, min_ratio=1.0), r"min_ratio must be None or a number in \[0, 1\)"),
        (dict(method="svd_llm", ratio=0.5, data=[{"input_ids": torch.tensor([[1, 500]])}]),
         "data batch 0 does not fit the model"),
        (dict(method="svd_llm", ratio=0.5, data=[torch.zeros(2, 3)]), "data batch 0 does not fit the model"),
        (dict(method="svd_llm", ratio=0.5, data=[]), "data is empty"),
        (dict(method="fwsvd", ratio=0.5, data=[{"input_ids": torch.tensor([[1, 2, 3]])}]), "fwsvd needs a loss"),
        (dict(method="svd_llm", ratio=0.5, whitening="qr", data=[make_batch()]), "whitening must be one of"),
    ],
)
def test_bad_calls_raise_and_leave_model_untouched(llama, kwargs, message):
    before = snapshot(llama)
    method = kwargs.pop("method")
    with pytest.raises(RankwiseError, match=message):
        compress(llama, method, **kwargs)
    assert_unchanged(llama, before)
    assert not hasattr(llama, "rankwise_compression")


def test_compressing_twice_refuses_factorized_layers(llama):
    compress(llama, "svd", ratio=0.5)
    before = snapshot(llama)
    with pytest.raises(RankwiseError, match="already FactorizedLinear"):
        compress(llama, "svd", ratio=0.5)
    assert_unchanged(llama, before)


def test_layers_a_method_cannot_take_are_skipped_and_listed(llama):
    pytest.importorskip("bitsandbytes")
    from test_layers import quantized_copy

    quantized = "model.layers.0.mlp.up_proj"
    llama.model.layers[0].mlp.up_proj = quantized_copy(llama.get_submodule(quantized), "linear4bit")
    compress(llama, "svd", ratio=0.5)
    summary = llama.rankwise_compression
    assert quantized not in summary["layers"] and "bitsandbytes linear4bit" in summary["skipped"][quantized]
    assert "rankwise.compensate" in summary["skipped"][quantized]
    assert len(summary["layers"]) == 13 and type(llama.get_submodule(quantized)).__name__ == "Linear4bit"
    with pytest.raises(RankwiseError, match="can take none of the targeted layers.*bitsandbytes"):
        compress(llama, "svd", ratio=0.5, targets=[quantized])


def test_layers_inside_a_structured_block_are_not_compressed_again(tmp_path):
    model = compress(make_llama(), "modegpt", ratio=0.5, data=[make_batch()], parts=("mlp",))
    compress(model, "svd", ratio=0.5)
    summary = model.rankwise_compression
    assert len(summary["layers"]) == 8 and all(".self_attn." in name for name in summary["layers"])
    assert summary["skipped"]["model.layers.1.mlp.down_proj"] == \
        "already compressed: part of the structured block model.layers.1.mlp"
    save_compressed(model, tmp_path)
    batch = make_batch(seed=4)
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path)(**batch).logits, model(**batch).logits)


def test_modegpt_refuses_models_without_llama_blocks(gpt2, minilm_once):
    for model in (gpt2, minilm_once):
        before = snapshot(model)
        with pytest.raises(RankwiseError, match="modegpt compresses LLaMA decoder blocks.*use svd_llm, asvd or welore"):
            compress(model, "modegpt", ratio=0.5, data=[make_batch()])
        assert_unchanged(model, before)


class _CalibrationProbe(SVDCompressor):
    """A data-driven test method: records the statistics compress hands it."""

    calibration = ("input_covariance",)
    seen: dict = {}

    def factorize(self, name, linear, rank, stats):
        type(self).seen[name] = stats
        return super().factorize(name, linear, rank, stats)


def test_data_driven_methods_receive_calibration_statistics(monkeypatch, llama, batch):
    register_for_test(monkeypatch, COMPRESSORS, "probe", _CalibrationProbe)
    target = "model.layers.0.self_attn.q_proj"
    with pytest.raises(RankwiseError, match="data-driven"):
        compress(llama, "probe", ratio=0.5, targets=[target])
    inputs = []
    handle = llama.get_submodule(target).register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        llama(**batch)
    handle.remove()
    rows = torch.cat(inputs).reshape(-1, 32)
    _CalibrationProbe.seen = {}
    compress(llama, "probe", ratio=0.5, targets=[target], data=[batch])
    stats = _CalibrationProbe.seen[target].input_covariance
    assert stats.count == rows.shape[0] == 32 and stats.gram.dtype == torch.float64
    assert torch.allclose(stats.gram, rows.double().T @ rows.double(), rtol=1e-12, atol=1e-12)
    assert isinstance(llama.get_submodule(target), FactorizedLinear)


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_llama_gives_identical_outputs(tmp_path, llama, batch, dtype):
    model = compress(llama.to(dtype), "svd", ratio=0.4)
    save_compressed(model, tmp_path)
    manifest = json.loads((tmp_path / "rankwise_compressed.json").read_text())
    assert manifest["compression"]["realised_ratio"] <= 0.4
    assert manifest["modules"]["model.layers.1.mlp.up_proj"] == {
        "kind": "factorized", "in_features": 32, "out_features": 64, "rank": 8, "bias": False, "source_kind": "linear"}
    loaded = load_compressed(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.model.layers[1].mlp.up_proj.rank == model.model.layers[1].mlp.up_proj.rank
    assert next(loaded.parameters()).dtype == dtype
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    # the file holds the factors, not a dense weight put back
    from safetensors import safe_open

    with safe_open(str(tmp_path / "rankwise_compressed.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.self_attn.q_proj.down.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys


def test_transformers_refuses_a_compressed_directory(tmp_path, llama):
    from transformers import AutoModelForCausalLM

    save_compressed(compress(llama, "svd", ratio=0.5), tmp_path)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_load_builds_on_the_meta_device(tmp_path, llama, monkeypatch):
    """No dense copy is materialised: the architecture's parameters are meta tensors until the file's are assigned."""
    from rankwise.compress import io

    save_compressed(compress(llama, "svd", ratio=0.5), tmp_path)
    seen = []
    original = io._install_shells

    def spy(model, modules, dtype):
        seen.append({p.device.type for p in model.parameters()})
        original(model, modules, dtype)
        seen.append({p.device.type for p in model.parameters()})

    monkeypatch.setattr(io, "_install_shells", spy)
    loaded = load_compressed(tmp_path)
    assert seen == [{"meta"}, {"meta"}]
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert all(not b.is_meta for b in loaded.buffers())  # the rotary frequencies were built for real


def test_save_load_bert_gives_identical_outputs(tmp_path):
    # A small BertModel (the MiniLM architecture): rebuilding the 22M-parameter MiniLM from
    # its config costs seconds and tests nothing more.
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    model = compress(BertModel(config).eval(), "svd", ratio=0.5, targets=r".*attention\.self\.(query|value)")
    save_compressed(model, tmp_path / "out")
    loaded = load_compressed(tmp_path / "out")
    assert type(loaded).__name__ == "BertModel"
    ids = torch.tensor([[1, 7, 20, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_save_refuses_models_it_cannot_describe(tmp_path, llama):
    with pytest.raises(RankwiseError, match="no compressed layers"):
        save_compressed(llama, tmp_path / "a")
    with pytest.raises(RankwiseError, match="transformers model"):
        save_compressed(nn.Sequential(FactorizedLinear(4, 4, 2)), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_validates_the_directory(tmp_path, llama):
    with pytest.raises(RankwiseError, match="not a directory"):
        load_compressed(tmp_path / "missing")
    save_compressed(compress(llama, "svd", ratio=0.5), tmp_path)

    manifest_path = tmp_path / "rankwise_compressed.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["modules"]["model.layers.0.self_attn.q_proj"]["rank"] += 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RankwiseError, match="does not match"):
        load_compressed(tmp_path)

    manifest["modules"]["model.layers.0.self_attn.q_proj"]["rank"] -= 1
    manifest["modules"]["model.layers.0.self_attn.q_proj"]["kind"] = "tucker"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RankwiseError, match=r"unknown kinds \['tucker'\]"):
        load_compressed(tmp_path)

    manifest_path.write_text("{not json")
    with pytest.raises(RankwiseError, match="not valid JSON"):
        load_compressed(tmp_path)

    (tmp_path / "rankwise_compressed.safetensors").write_bytes(b"\x00garbage")
    manifest["modules"]["model.layers.0.self_attn.q_proj"]["kind"] = "factorized"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RankwiseError, match="not a readable safetensors"):
        load_compressed(tmp_path)

    (tmp_path / "rankwise_compressed.safetensors").unlink()
    with pytest.raises(RankwiseError, match="lacks rankwise_compressed.safetensors"):
        load_compressed(tmp_path)


# ---------------------------------------------------------------- densify of other rankwise models


def test_densify_folds_adapters_and_parametrisations(llama, batch):
    import rankwise
    from rankwise.pretrain import parametrize

    adapted = rankwise.adapt(copy.deepcopy(llama), "lora", rank=4)
    with torch.no_grad():
        for layer in rankwise.adapters.adapter_layers(adapted).values():
            layer.lora_B.normal_()
        expected = adapted(**batch).logits
        plain = densify(adapted)
        assert rankwise_modules(plain) == []
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)

    parametrised = parametrize(copy.deepcopy(llama), "lowrank", rank=4)
    with torch.no_grad():
        expected = parametrised(**batch).logits
        plain = densify(parametrised)
        assert rankwise_modules(plain) == []
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- FactorizedLinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factorized_linear_round_trips(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(12, 20, dtype=dtype)
    full = FactorizedLinear.from_linear(dense, 12)
    assert full.up.weight.dtype == dtype and full.rank == 12
    x = torch.randn(3, 12, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert torch.allclose(full(x), dense(x), atol=tol)
    back = full.to_linear()
    assert isinstance(back, nn.Linear) and back.weight.dtype == dtype
    assert torch.equal(back.bias, dense.bias) and torch.allclose(back(x), full(x), atol=tol)
    assert full.factor_parameters() == 12 * (12 + 20)
    with pytest.raises(RankwiseError, match="exceeds"):
        FactorizedLinear.from_linear(dense, 13)
    with pytest.raises(RankwiseError, match="positive integer"):
        FactorizedLinear(12, 20, 0)
    with pytest.raises(RankwiseError, match="source_kind must be one of linear, conv1d"):
        FactorizedLinear(12, 20, 2, source_kind="conv2d")

