"""Each data-aware factorisation is optimal for its own objective, checked on the real MiniLM's weights and
activations against plain SVD; whitening survives singular Gram matrices; SVD-LLM's refit is the least-squares
fit; WeLore's and the sensitivity allocation's rules on known answers and on real vs random spectra."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from torch import nn

from rankwise.compress import compress, plan_ranks, rank_for_ratio
from rankwise.compress.allocation import normalised_spectrum
from rankwise.compress.statistics import collect
from rankwise.compress.whitening import Whitening, weighted_truncation
from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear

LAYER = "encoder.layer.0.intermediate.dense"  # 1536 x 384, real weights, GELU-bound inputs


@pytest.fixture(scope="module")
def minilm_once(minilm_path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="module")
def real_batches(minilm_path):
    from transformers import AutoTokenizer

    from rankwise.compress.evaluation import encoder_batches
    from rankwise.data.corpus import load_corpus

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    return encoder_batches(load_corpus("finetune", "validation")[:40], tokenizer, seq_len=64, batch_size=4,
                           max_batches=3)


@pytest.fixture(scope="module")
def layer_statistics(minilm_once, real_batches):
    from rankwise.compress.evaluation import contrastive_loss

    return collect(minilm_once, [LAYER], real_batches, ("input_covariance", "input_abs_mean", "weight_fisher"),
                   loss_fn=contrastive_loss)[LAYER]


def compressed_weight(minilm, batches, method: str, **kwargs) -> torch.Tensor:
    from rankwise.compress.evaluation import contrastive_loss

    model = copy.deepcopy(minilm)
    compress(model, method, ratio=0.5, targets=[LAYER], data=batches, keep_dense_above=None,
             loss_fn=contrastive_loss if method == "fwsvd" else None, **kwargs)
    layer = model.get_submodule(LAYER)
    assert isinstance(layer, FactorizedLinear) and layer.rank == math.floor(0.5 * 1536 * 384 / 1920)
    return layer.dense_weight().detach().double()


def output_error(weight, approximation, gram) -> float:
    """``sum_t ||(W - W') x_t||^2 = tr(D C D^T)``."""
    delta = weight - approximation
    return float(((delta @ gram) * delta).sum())


def test_svd_llm_minimises_the_output_error_on_real_activations(minilm_once, real_batches, layer_statistics):
    weight = minilm_once.get_submodule(LAYER).weight.detach().double()
    gram = layer_statistics.input_covariance.gram
    plain = output_error(weight, compressed_weight(minilm_once, real_batches, "svd"), gram)
    whitened = output_error(weight, compressed_weight(minilm_once, real_batches, "svd_llm"), gram)
    eigen = output_error(weight, compressed_weight(minilm_once, real_batches, "svd_llm", whitening="eigen"), gram)
    assert whitened < 0.8 * plain
    # the known minimum: the discarded singular values of W S, C = S S^T
    _, _, sigma = weighted_truncation(weight, 1, columns=Whitening.cholesky(gram))
    k = math.floor(0.5 * 1536 * 384 / 1920)
    assert whitened == pytest.approx(float(sigma[k:].square().sum()), rel=1e-4)
    assert eigen == pytest.approx(whitened, rel=1e-4)  # v2's truncation reaches the same minimum


def test_asvd_minimises_the_activation_scaled_error(minilm_once, real_batches, layer_statistics):
    weight = minilm_once.get_submodule(LAYER).weight.detach().double()
    scales = layer_statistics.extra["input_abs_mean"].double() ** 0.5

    def scaled_error(approximation):
        return float(((weight - approximation) * scales).square().sum())

    plain = scaled_error(compressed_weight(minilm_once, real_batches, "svd"))
    asvd = scaled_error(compressed_weight(minilm_once, real_batches, "asvd"))
    assert asvd < 0.95 * plain
    _, _, sigma = weighted_truncation(weight, 1, columns=Whitening.diagonal(scales))
    assert asvd == pytest.approx(float(sigma[153:].square().sum()), rel=1e-4)


def test_fwsvd_minimises_the_fisher_weighted_error(minilm_once, real_batches, layer_statistics):
    weight = minilm_once.get_submodule(LAYER).weight.detach().double()
    rows = layer_statistics.extra["weight_fisher"].double().sum(dim=1)
    assert rows.min() > 0 and rows.max() / rows.min() > 2  # a real, uneven Fisher information

    def fisher_error(approximation):
        return float((rows * (weight - approximation).square().sum(dim=1)).sum())

    plain = fisher_error(compressed_weight(minilm_once, real_batches, "svd"))
    fwsvd = fisher_error(compressed_weight(minilm_once, real_batches, "fwsvd"))
    assert fwsvd < 0.95 * plain
    _, _, sigma = weighted_truncation(weight, 1, rows=rows.sqrt())
    assert fwsvd == pytest.approx(float(sigma[153:].square().sum()), rel=1e-4)


class Duplicate(nn.Module):
    """``x -> [x, x]``: the next layer's inputs have duplicated channels (a singular Gram matrix)."""

    def forward(self, x):
        return torch.cat([x, x], dim=-1)


def test_whitening_survives_a_singular_covariance():
    torch.manual_seed(0)
    model = nn.Sequential(Duplicate(), nn.Linear(16, 12)).double()
    data = [torch.randn(64, 8, dtype=torch.float64) for _ in range(2)]
    gram = sum(torch.cat([x, x], 1).T @ torch.cat([x, x], 1) for x in data)
    assert torch.linalg.matrix_rank(gram).item() == 8
    whitening = Whitening.cholesky(gram)
    assert whitening.jitter > 0 and torch.isfinite(whitening.root).all()
    weight = model[1].weight.detach().clone()
    plain = output_error(weight, compress(copy.deepcopy(model), "svd", ratio=0.5, keep_dense_above=None)[1]
                         .dense_weight().detach(), gram)
    for mode in ("cholesky", "eigen"):
        layer = compress(copy.deepcopy(model), "svd_llm", ratio=0.5, data=data, keep_dense_above=None,
                         whitening=mode)[1]
        factors = torch.cat([layer.up.weight.flatten(), layer.down.weight.flatten()])
        assert torch.isfinite(factors).all() and factors.abs().max() < 1e3 * weight.abs().max()
        # rank k on an 8-dimensional input space: the optimum keeps the top k directions of W x on the data
        k = rank_for_ratio(12, 16, 0.5)
        values = torch.linalg.eigvalsh(weight @ gram @ weight.T).flip(0)
        error = output_error(weight, layer.dense_weight().detach(), gram)
        assert layer.rank == k and error <= plain
        assert error == pytest.approx(float(values[k:].sum()), rel=1e-6, abs=1e-9)


def test_svd_llm_refit_is_the_least_squares_fit_on_the_compressed_models_inputs():
    """The refitted ``up`` solves min ||W x' - up down x'|| over the inputs x' each layer receives after compression."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    data = [torch.randn(50, 12, dtype=torch.float64) for _ in range(3)]
    originals = copy.deepcopy(model)
    compress(model, "svd_llm", ratio=0.4, data=data, keep_dense_above=None, refit=True)
    plain = compress(copy.deepcopy(originals), "svd_llm", ratio=0.4, data=data, keep_dense_above=None)
    second = model[2]
    with torch.no_grad():
        inputs = torch.cat([model[1](model[0](x)) for x in data])  # what layer 2 sees in the compressed model
        targets = inputs @ originals[2].weight.T
        features = inputs @ second.down.weight.T
        solution = torch.linalg.lstsq(features, targets).solution.T
    assert torch.allclose(second.down.weight, plain[2].down.weight)  # the refit leaves down as truncated
    torch.testing.assert_close(second.up.weight, solution, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(second.up.weight, plain[2].up.weight)


# ----- WeLore ---------------------------------------------------------------------------------


def test_welore_ranks_are_non_uniform_on_real_weights_and_uniform_on_a_random_init(minilm_once):
    from transformers import BertModel

    torch.manual_seed(0)
    random_init = BertModel(minilm_once.config).eval()

    def spread(model):
        plan = plan_ranks(model, 0.5, method="welore", keep_dense_above=None)
        assert plan.realised_ratio <= 0.5
        kept = [layer.rank / min(layer.shape) for layer in plan.layers.values() if layer.shape == (384, 384)]
        return statistics.pstdev(kept)

    assert spread(minilm_once) > 0.1  # heavy-tailed spectra differ from layer to layer
    assert spread(random_init) < 0.02  # Marchenko-Pastur spectra of one shape are all alike


def test_welore_normalises_each_spectrum_min_max_and_searches_one_threshold():
    """Two layers whose spectra are affine images of one another drop the same number of values (up to the
    rounding of their SVDs: one) for any threshold; a third with a flat spectrum keeps everything; the
    threshold is the smallest that meets the ratio."""
    from rankwise.compress.plan import LayerSpec, kept_parameters

    base = torch.linspace(0, 1, 32, dtype=torch.float64) ** 3
    spectra = [1 + 2 * base, 5 + 40 * base, torch.full((32,), 3.0, dtype=torch.float64)]
    model = nn.Sequential()
    for index, spectrum in enumerate(spectra):
        gen = torch.Generator().manual_seed(index)
        q1, _ = torch.linalg.qr(torch.randn(64, 32, generator=gen, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
        layer = nn.Linear(32, 64, bias=False, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(q1 @ torch.diag(spectrum.flip(0)) @ q2.T)
        model.add_module(str(index), layer)
    normalised = [normalised_spectrum(model[i].weight) for i in range(2)]
    for values in normalised:
        torch.testing.assert_close(values.sort().values, base, rtol=0, atol=1e-9)
    plan = plan_ranks(model, 0.6, method="welore", keep_dense_above=None)
    ranks, tau = plan.ranks, plan.info["threshold"]
    assert abs(ranks["0"] - ranks["1"]) <= 1 and max(ranks["0"], ranks["1"]) < 32
    assert ranks["2"] == 32  # the flat spectrum is an N-LRC: nothing below any threshold
    for i in range(2):
        assert ranks[str(i)] == 32 - int((normalised[i] < tau).sum())
    # the next lower threshold does not meet the budget: tau is the smallest that does
    lower = torch.cat(normalised)[torch.cat(normalised) < tau].max()
    specs = [LayerSpec(str(i), "linear", 64, 32) for i in range(2)]
    stored_lower = sum(kept_parameters(spec, 32 - int((values < lower).sum()), None)
                       for spec, values in zip(specs, normalised)) + 64 * 32
    assert stored_lower > 0.6 * 3 * 64 * 32 >= plan.kept_parameters
    assert plan.info["lrc"] == ["0", "1"]


# ----- the measured-sensitivity allocation ----------------------------------------------------------


def test_sensitivity_allocation_gives_rank_where_the_loss_needs_it():
    """Layer A is nearly rank 4 (cheap to compress), layer B is full rank: B gets the larger share."""
    torch.manual_seed(0)
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    with torch.no_grad():
        a.weight.copy_(torch.randn(32, 4) @ torch.randn(4, 32) / 4 + 0.01 * torch.randn(32, 32))
    model = nn.Sequential(a, nn.Tanh(), b)
    data = [torch.randn(64, 32) for _ in range(2)]
    with torch.no_grad():
        reference = [model(x) for x in data]

    def loss_fn(m, x):
        index = next(i for i, d in enumerate(data) if d is x)
        return (m(x) - reference[index]).square().mean()

    compress(model, "svd", ratio=0.4, data=data, allocation="sensitivity", loss_fn=loss_fn, keep_dense_above=None)
    summary = model.rankwise_compression
    assert summary["allocation"] == "sensitivity" and summary["realised_ratio"] <= 0.4
    assert summary["ranks"]["2"] > summary["ranks"]["0"] >= 4
    # the uniform split at the same ratio loses more
    uniform = compress(copy.deepcopy(nn.Sequential(a, nn.Tanh(), b)), "svd", ratio=0.4, keep_dense_above=None)
    with torch.no_grad():
        assert sum(loss_fn(model, x) for x in data) < sum(loss_fn(uniform, x) for x in data)


def test_sensitivity_without_a_loss_uses_output_fidelity(minilm_once, real_batches):
    model = copy.deepcopy(minilm_once)
    compress(model, "svd", ratio=0.5, data=real_batches[:1], allocation="sensitivity",
             targets=r"encoder\.layer\.0\.attention\.self\.(query|value)")
    summary = model.rankwise_compression
    assert summary["realised_ratio"] <= 0.5 and summary["allocation_info"]["base_objective"] == pytest.approx(0.0, abs=1e-6)
    increases = summary["allocation_info"]["loss_increase"]["encoder.layer.0.attention.self.value"]
    assert all(v > 0 for k, v in increases.items() if int(k) < 192)


def test_sensitivity_refuses_a_ratio_its_grid_cannot_meet():
    with pytest.raises(RankwiseError, match="smallest candidate ranks"):
        compress(nn.Sequential(nn.Linear(32, 32)), "svd", ratio=0.05, data=[torch.randn(4, 32)],
                 allocation="sensitivity", loss_fn=lambda m, x: m(x).square().mean())


# ----- SVD-LLM v2's heterogeneous allocation --------------------------------------------------------


def _layers_with_spectra(spectra: list[torch.Tensor], out_features: int = 48, in_features: int = 32) -> nn.Module:
    """``layers.<i>.proj`` with the given singular values (float64), so the allocation sees one type group."""
    model = nn.Module()
    model.layers = nn.ModuleList()
    for index, spectrum in enumerate(spectra):
        gen = torch.Generator().manual_seed(index)
        left, _ = torch.linalg.qr(torch.randn(out_features, in_features, generator=gen, dtype=torch.float64))
        right, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=gen, dtype=torch.float64))
        block = nn.Module()
        block.proj = nn.Linear(in_features, out_features, bias=False, dtype=torch.float64)
        with torch.no_grad():
            block.proj.weight.copy_(left @ torch.diag(spectrum) @ right.T)
        model.layers.append(block)
    return model


def test_svd_llm_v2_shares_a_groups_compression_by_one_over_log_truncation_loss():
    """Known answer: with plain SVD the truncation loss at the uniform rank is the root of the discarded
    squared singular values, and each layer's rank follows R_l = |G| (1 - ratio) (1/log L_l) / sum 1/log L_j."""
    from rankwise.compress.allocation import layer_type

    decay = torch.linspace(1, 0.05, 32, dtype=torch.float64)
    spectra = [40 * decay ** 3, 40 * decay, 40 * decay ** 0.3]  # fast, medium, slow decay: cheap to costly
    model = _layers_with_spectra(spectra)
    ratio = 0.5
    break_even = 48 * 32 / (48 + 32)
    uniform = math.floor(ratio * break_even)
    losses = [float(s[uniform:].square().sum().sqrt()) for s in spectra]
    weights = [1 / math.log(loss) for loss in losses]
    expected = [max(1, math.floor((1 - 3 * (1 - ratio) * w / sum(weights)) * break_even)) for w in weights]
    plan = plan_ranks(model, ratio, method="svd", allocation="svd_llm_v2", keep_dense_above=None)
    assert layer_type("layers.2.proj") == "layers.*.proj"
    assert [plan.ranks[f"layers.{i}.proj"] for i in range(3)] == expected
    for i, loss in enumerate(losses):
        assert plan.info["truncation_loss"][f"layers.{i}.proj"] == pytest.approx(loss, rel=1e-9)
    assert expected[0] < uniform < expected[2]  # the layer that truncates cheaply is compressed most
    assert plan.realised_ratio <= ratio and plan.info["uniform_groups"] == []


def test_svd_llm_v2_keeps_a_group_uniform_where_its_rule_is_undefined():
    decay = torch.linspace(1, 0.05, 32, dtype=torch.float64)
    model = _layers_with_spectra([0.01 * decay, 0.02 * decay])  # truncation losses < 1: log L < 0
    plan = plan_ranks(model, 0.5, method="svd", allocation="svd_llm_v2", keep_dense_above=None)
    assert set(plan.ranks.values()) == {math.floor(0.5 * 48 * 32 / 80)}
    assert plan.info["uniform_groups"] == ["layers.*.proj"]


def test_svd_llm_v2_loss_is_the_whitened_tail_on_real_activations(minilm_once, real_batches):
    """With SVD-LLM the theoretical truncation loss is sqrt(sum_{i>k} sigma_i^2) of W S, S S^T = C (the paper's
    L_min), computed here independently from the layer's Gram matrix; the ranks of a type group differ."""
    model = copy.deepcopy(minilm_once)
    targets = [f"encoder.layer.{i}.intermediate.dense" for i in range(6)]
    plan = plan_ranks(model, 0.5, targets, method="svd_llm", data=real_batches, allocation="svd_llm_v2",
                      keep_dense_above=None, whitening="eigen")
    gram = collect(model, [LAYER], real_batches, ("input_covariance",))[LAYER].input_covariance.gram.double()
    weight = model.get_submodule(LAYER).weight.detach().double()
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    root = eigenvectors @ torch.diag(eigenvalues.clamp_min(0).sqrt())
    singular = torch.linalg.svdvals(weight @ root)
    uniform = math.floor(0.5 * 1536 * 384 / (1536 + 384))
    assert plan.info["truncation_loss"][LAYER] == pytest.approx(float(singular[uniform:].square().sum().sqrt()),
                                                                rel=1e-6)
    assert len({plan.ranks[name] for name in targets}) > 1
    assert plan.realised_ratio <= 0.5 + (1536 + 384) / (1536 * 384) * len(targets)
