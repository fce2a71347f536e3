"""Spectral diagnostics: the registry's table of known answers, constructed matrices, real vs random weights."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rankwise.analyze
from cases import collect
from cases.analyze_heavy_tail import clauset_alpha
from cases.analyze_ranks_norms import SPREAD, rankme, with_spectrum
from cases.row_types import DiagnosticCase, UpdateCase
from rankwise.analyze import (
    DIAGNOSTICS,
    effective_rank,
    effective_rank_of_spectrum,
    energy_rank,
    matrix_diagnostics,
    method_options,
    model_report,
    nuclear_norm,
    power_law_alpha,
    spectrum,
    stable_rank,
    stable_rank_of_spectrum,
    training_diagnostics,
    update_diagnostics,
    update_report,
)
from rankwise.analyze.heavy_tail import fit_power_law
from rankwise.compress import compress
from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear

ROWS = collect("analyze_")
MATRIX_CASES = [c for c in ROWS if isinstance(c, DiagnosticCase)]
UPDATE_CASES = [c for c in ROWS if isinstance(c, UpdateCase)]
matrix_cases = pytest.mark.parametrize("case", MATRIX_CASES, ids=[c.id for c in MATRIX_CASES])
update_cases = pytest.mark.parametrize("case", UPDATE_CASES, ids=[c.id for c in UPDATE_CASES])


def one_layer(weight: torch.Tensor) -> nn.Sequential:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


# ----- the table: every registered diagnostic, known answers --------------------------------


def test_every_registered_diagnostic_has_a_row_of_its_kind():
    # training diagnostics (the intrinsic dimension) have their known answers in tests/test_analyze_intrinsic.py
    kinds = set(matrix_diagnostics()) | set(update_diagnostics()) | set(training_diagnostics())
    assert kinds == set(DIAGNOSTICS.names())
    missing = (set(matrix_diagnostics()) - {c.diagnostic for c in MATRIX_CASES}) | (
        set(update_diagnostics()) - {c.diagnostic for c in UPDATE_CASES})
    assert not missing, f"registered diagnostics without a row in tests/cases/analyze_*.py: {sorted(missing)}"
    assert not {c.diagnostic for c in MATRIX_CASES} & set(update_diagnostics())
    assert not {c.diagnostic for c in UPDATE_CASES} & set(matrix_diagnostics())


@pytest.mark.parametrize("name", DIAGNOSTICS.names())
def test_every_diagnostic_is_a_public_function_taking_its_declared_options(name):
    # the report column, the registry name and rankwise.analyze.<name> are one thing, and the
    # function's keyword parameters are the declared options with the same defaults
    function = getattr(rankwise.analyze, name)
    parameters = inspect.signature(function).parameters
    for option_name, option in method_options(name).items():
        assert parameters[option_name].default == option.default, (name, option_name)
    with pytest.raises(RankwiseError, match=rf"diagnostic '{name}': unknown option\(s\) eps"):
        DIAGNOSTICS.get(name)(method=name, eps=1e-3)


@matrix_cases
def test_known_answer_through_the_registry_and_the_public_function(case):
    matrix = case.matrix()
    measured = DIAGNOSTICS.get(case.diagnostic)(**case.options).measure(matrix, spectrum(matrix))
    assert measured == pytest.approx(case.expected, rel=case.rel, abs=case.abs)
    public = getattr(rankwise.analyze, case.diagnostic)(matrix, **case.options)
    assert float(public) == pytest.approx(case.expected, rel=case.rel, abs=case.abs)


@update_cases
def test_update_known_answer_through_the_registry_and_the_public_function(case):
    base, tuned = case.matrices()
    measured = DIAGNOSTICS.get(case.diagnostic)(**case.options).measure(base, tuned)
    assert measured == pytest.approx(case.expected, rel=case.rel, abs=case.abs)
    public = getattr(rankwise.analyze, case.diagnostic)(base, tuned, **case.options)
    assert float(public) == pytest.approx(case.expected, rel=case.rel, abs=case.abs)


@matrix_cases
def test_model_report_gives_the_known_answer(case):
    matrix = case.matrix()
    options = {case.diagnostic: case.options} if case.options else None
    (row,) = model_report(one_layer(matrix), diagnostics=[case.diagnostic], options=options)
    assert row["name"] == "0" and row["shape"] == tuple(matrix.shape) and row["rank"] == min(matrix.shape)
    assert set(row) == {"name", "shape", "rank", case.diagnostic}
    assert row[case.diagnostic] == pytest.approx(case.expected, rel=case.rel, abs=case.abs)


@update_cases
def test_update_report_gives_the_known_answer(case):
    base, tuned = case.matrices()
    options = {case.diagnostic: case.options} if case.options else None
    (row,) = update_report(one_layer(base), one_layer(tuned), diagnostics=[case.diagnostic], options=options)
    update = tuned - base
    assert row["name"] == "0" and row["shape"] == tuple(base.shape)
    assert row["update_norm"] == pytest.approx(float(update.norm()), rel=1e-6)
    assert row["relative_update"] == pytest.approx(float(update.norm() / base.norm()), rel=1e-6)
    assert row[case.diagnostic] == pytest.approx(case.expected, rel=case.rel, abs=case.abs)


@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_identity(n):
    eye = torch.eye(n)
    assert torch.equal(spectrum(eye), torch.ones(n))
    assert effective_rank(eye) == pytest.approx(rankme([1.0] * n), rel=1e-9)
    assert effective_rank(eye) == pytest.approx(n, abs=1e-4 * n)
    assert stable_rank(eye) == pytest.approx(n, rel=1e-6)
    assert nuclear_norm(eye) == pytest.approx(n, rel=1e-6)
    assert spectrum(torch.diag(torch.tensor([3.0, 4.0]))).tolist() == [4.0, 3.0]


@pytest.mark.parametrize("n", [3, 17, 64])
def test_orthogonal_matrix_has_full_effective_rank_and_rank_one_has_one(n):
    gen = torch.Generator().manual_seed(n)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    # all singular values 1: RankMe gives n up to the O(n * 1e-7) of its epsilon
    assert effective_rank(q) == pytest.approx(rankme([1.0] * n), rel=1e-9)
    assert effective_rank(q) == pytest.approx(n, abs=1e-4 * n)
    assert stable_rank(q) == pytest.approx(n, rel=1e-12)
    assert energy_rank(q, 1.0) == n and energy_rank(q, 0.5) == math.ceil(n / 2)
    rank_one = torch.outer(torch.randn(n, generator=gen, dtype=torch.float64),
                           torch.randn(n + 2, generator=gen, dtype=torch.float64))
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=(n + 1) * 2e-6)
    assert stable_rank(rank_one) == pytest.approx(1.0, rel=1e-12)
    assert energy_rank(rank_one, 1.0) == 1


def test_constructed_spectrum_is_recovered_descending_fp32():
    s = torch.tensor([9.0, 5.0, 2.0, 0.5], dtype=torch.float64)
    q1, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))
    w = (q1 @ torch.diag(s) @ q2.T).to(torch.bfloat16)
    result = spectrum(w)
    assert result.dtype == torch.float32 and result.shape == (6,)  # min(10, 6) values
    assert torch.all(result[:-1] >= result[1:])
    expected = torch.cat([s.float(), torch.zeros(2)])
    assert torch.allclose(result, expected, rtol=2e-2, atol=3e-2)  # bf16 rounding of the entries


def test_accepts_linear_and_factorized_layers():
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    assert torch.allclose(spectrum(linear), torch.linalg.svdvals(linear.weight.detach()))
    factorized = FactorizedLinear.from_linear(linear, 3)
    assert torch.allclose(spectrum(factorized)[:3], spectrum(linear)[:3], rtol=1e-5)
    assert stable_rank(factorized) == pytest.approx(stable_rank(factorized.dense_weight().detach()), rel=1e-6)
    assert effective_rank(factorized) <= 3 + 1e-3


def test_conv1d_layers_are_read_as_out_x_in(gpt2):
    """GPT-2's Conv1D stores W^T; the report must give the shape and spectrum of W (out x in),
    the matrix the layer's forward applies: x @ weight + bias, i.e. out = W x with W = weight^T."""
    rows = model_report(gpt2, diagnostics=["spectral_norm", "nuclear_norm"])
    names = [r["name"] for r in rows]
    assert names[:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                         "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    layer = gpt2.get_submodule("transformer.h.0.attn.c_attn")
    applied = layer(torch.eye(32)) - layer.bias  # row i = W e_i = column i of W, so this is W^T
    assert rows[0]["shape"] == (96, 32) and tuple(applied.T.shape) == (96, 32)
    singular_values = torch.linalg.svdvals(applied.detach().double())
    assert rows[0]["spectral_norm"] == pytest.approx(float(singular_values[0]), rel=1e-5)
    assert rows[0]["nuclear_norm"] == pytest.approx(float(singular_values.sum()), rel=1e-5)
    assert "lm_head" not in names  # tied to the embedding: the head, left out by all-linear


@pytest.mark.parametrize("kind", ["linear4bit", "linear8bit"])
def test_quantized_layers_are_read_dequantised(kind):
    from test_layers import quantized_copy

    torch.manual_seed(0)
    layer = quantized_copy(nn.Linear(64, 48, bias=False), kind)
    (row,) = model_report(nn.Sequential(layer), diagnostics=["spectral_norm", "stable_rank"])
    applied = layer(torch.eye(64)).T.double()  # bitsandbytes' own forward: the matrix it multiplies by
    singular_values = torch.linalg.svdvals(applied)
    assert row["shape"] == (48, 64)
    assert row["spectral_norm"] == pytest.approx(float(singular_values[0]), rel=1e-4)
    assert row["stable_rank"] == pytest.approx(float((singular_values**2).sum() / singular_values[0] ** 2), rel=1e-4)


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.ones(5), torch.empty(0, 3), "matrix"])
def test_bad_inputs_raise(bad):
    with pytest.raises(RankwiseError):
        stable_rank(bad)
    with pytest.raises(RankwiseError):
        effective_rank(bad)
    with pytest.raises(RankwiseError):
        energy_rank(bad)


def test_energy_rank_refuses_shares_outside_0_1():
    for share in (0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(RankwiseError, match=r"share must be a number in \(0, 1\]"):
            energy_rank(torch.eye(3), share)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), true_rank=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_bounds(m, n, true_rank, seed):
    gen = torch.Generator().manual_seed(seed)
    r = min(true_rank, m, n)
    w = torch.randn(m, r, generator=gen, dtype=torch.float64) @ torch.randn(r, n, generator=gen, dtype=torch.float64)
    assert 1 - 1e-9 <= stable_rank(w) <= r + 1e-9
    # the 1e-7 added to every p_k moves the entropy rank a hair off: below 1 for a 1 x 1
    # matrix (p = 1 + 1e-7), above r when zero singular values get p = 1e-7
    assert 1 - 1e-6 <= effective_rank(w) <= r + 1e-3
    assert 1 <= energy_rank(w, 0.9) <= energy_rank(w, 1.0) == r
    # ||W||_F <= ||W||_* <= sqrt(r) ||W||_F
    assert float(w.norm()) * (1 - 1e-6) <= nuclear_norm(w) <= math.sqrt(r) * float(w.norm()) * (1 + 1e-6)


# ----- heavy tails -----------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_power_law_alpha_recovers_the_exponent_of_a_sampled_power_law(alpha):
    """Eigenvalues drawn i.i.d. from p(lambda) ~ lambda^-alpha on [1, inf) (inverse CDF); the fit
    must find the exponent within its own standard error's reach and say so in its quality."""
    gen = torch.Generator().manual_seed(int(alpha * 10))
    uniforms = torch.rand(1500, generator=gen, dtype=torch.float64)
    eigenvalues = (1 - uniforms) ** (-1 / (alpha - 1))
    fit = fit_power_law(eigenvalues)
    assert fit.alpha == pytest.approx(alpha, abs=4 * fit.sigma + 0.05)
    assert fit.tail_size >= 100 and fit.ks_distance < 0.05
    assert fit.alpha == pytest.approx(clauset_alpha(eigenvalues.tolist()), rel=1e-9)


def test_power_law_alpha_is_scale_free_and_reads_layers():
    matrix = torch.randn(80, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = power_law_alpha(matrix)
    assert power_law_alpha(1000.0 * matrix).alpha == pytest.approx(fit.alpha, rel=1e-4)
    assert fit.num_eigenvalues == 60 and fit.xmin <= fit.xmax and float(fit) == fit.alpha
    layer = nn.Linear(60, 80, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(matrix)
    assert power_law_alpha(layer) == fit


def test_power_law_alpha_needs_twenty_eigenvalues():
    with pytest.raises(RankwiseError, match="at least 20 positive eigenvalues, got 19"):
        power_law_alpha(torch.randn(30, 19))
    with pytest.raises(RankwiseError, match="got 3"):
        power_law_alpha(with_spectrum([3.0, 2.0, 1.0], 40, 30))
    # the report shows None for such a layer instead of failing the whole table
    (row,) = model_report(one_layer(torch.randn(30, 19)), diagnostics=["power_law_alpha"])
    assert row["power_law_alpha"] is None


def test_power_law_alpha_agrees_with_weightwatcher_on_real_weights(minilm):
    """WeightWatcher (default analyze(): eigenvalues of W^T W, its own power-law fitter) is the oracle."""
    ww = pytest.importorskip("weightwatcher")
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    details = ww.WeightWatcher(model=minilm).analyze()
    expected_by_name = {row["longname"]: row for _, row in details.iterrows()}
    linear = [(name, module) for name, module in minilm.named_modules() if isinstance(module, nn.Linear)]
    assert len(linear) == 37 and {name for name, _ in linear} <= set(expected_by_name)
    for name, module in linear:
        expected = expected_by_name[name]
        fit = power_law_alpha(module)
        assert fit.alpha == pytest.approx(expected["alpha"], rel=1e-5), name
        assert fit.ks_distance == pytest.approx(expected["D"], rel=1e-4, abs=1e-6), name
        assert fit.xmin == pytest.approx(expected["xmin"], rel=1e-5), name
        assert fit.tail_size == expected["num_pl_spikes"], name


def test_trained_minilm_is_heavy_tailed_and_a_fresh_copy_is_not(minilm):
    """Martin & Mahoney: trained layers have 2 <= alpha <= 6; random ones have no power-law tail."""
    from transformers import AutoModel

    torch.manual_seed(0)
    fresh = AutoModel.from_config(minilm.config)
    trained = [r["power_law_alpha"] for r in model_report(minilm, diagnostics=["power_law_alpha"])]
    random = [r["power_law_alpha"] for r in model_report(fresh, diagnostics=["power_law_alpha"])]
    share = lambda alphas: sum(2 <= a <= 6 for a in alphas) / len(alphas)  # noqa: E731
    median = lambda alphas: sorted(alphas)[len(alphas) // 2]  # noqa: E731
    # measured: trained median 3.55, 34 of 37 layers in [2, 6]; fresh median 7.9, 10 of 37
    assert 2 <= median(trained) <= 6 and share(trained) >= 0.8
    assert median(random) > 6 and share(random) <= 0.5


def test_trained_minilm_layers_are_far_from_random(minilm):
    """Trained weights concentrate their energy in few directions; Gaussian ones do not."""
    gen = torch.Generator().manual_seed(0)
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.2.intermediate.dense"):
        weight = minilm.get_submodule(name).weight.detach()
        gaussian = torch.randn(weight.shape, generator=gen) * weight.std()
        trained_s, gaussian_s = spectrum(weight), spectrum(gaussian)
        # measured: stable rank 36 vs 96 (query 384x384) and 20 vs 173 (FFN 1536x384)
        assert stable_rank_of_spectrum(trained_s) < 0.5 * stable_rank_of_spectrum(gaussian_s)
        assert effective_rank_of_spectrum(trained_s) < effective_rank_of_spectrum(gaussian_s)
        # Gaussian matrices: stable rank ~ mn / (sqrt m + sqrt n)^2 (Marchenko-Pastur edge)
        m, n = weight.shape
        edge = m * n / (math.sqrt(m) + math.sqrt(n)) ** 2
        assert stable_rank_of_spectrum(gaussian_s) == pytest.approx(edge, rel=0.15)


# ----- the report --------------------------------------------------------------------------------


def test_model_report_reports_every_diagnostic_per_layer_with_known_values():
    """Two layers with constructed spectra, one dense and one factorised: every column known."""
    model = nn.Sequential(nn.Linear(6, 10, bias=False, dtype=torch.float64), nn.Linear(10, 10, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.copy_(with_spectrum(SPREAD, 10, 6))
        model[1].weight.copy_(with_spectrum([3.0, 1.0], 10, 10, seed=2))
    compress(model, "svd", ratio=0.45, targets=["1"])  # rank floor(0.45 * 100 / 20) = 2 keeps the whole spectrum
    rows = model_report(model, options={"energy_rank": {"share": 0.95}})
    assert [(r["name"], r["shape"], r["rank"]) for r in rows] == [("0", (10, 6), 6), ("1", (10, 10), 2)]
    expected = [
        {"effective_rank": rankme(SPREAD + [0.0, 0.0]), "stable_rank": (81 + 25 + 4 + 0.25) / 81,
         "spectral_norm": 9.0, "frobenius_norm": math.sqrt(81 + 25 + 4 + 0.25), "nuclear_norm": sum(SPREAD),
         "energy_rank": 2.0},  # 106 / 110.25 = 0.96 >= 0.95
        {"effective_rank": rankme([3.0, 1.0] + [0.0] * 8), "stable_rank": 10 / 9, "spectral_norm": 3.0,
         "frobenius_norm": math.sqrt(10), "nuclear_norm": 4.0, "energy_rank": 2.0},  # 9 / 10 < 0.95
    ]
    # The dense float64 layer is exact to rounding. The factorised one is reported through its
    # product, formed in float32: its eight null singular values come out near 1e-7 * sigma_1
    # instead of 0, the size of RankMe's epsilon, which moves the effective rank by ~1e-6.
    tolerances = [1e-9, 1e-5]
    for row, values, rel in zip(rows, expected, tolerances):
        assert set(row) == {"name", "shape", "rank", *matrix_diagnostics()}
        assert {k: row[k] for k in values} == pytest.approx(values, rel=rel)
        assert row["power_law_alpha"] is None  # 4 and 2 non-zero eigenvalues: too few for a fit


def test_model_report_selects_layers_and_refuses_bad_requests(llama):
    names = [n for n, m in llama.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert [r["name"] for r in model_report(llama)] == names
    compress(llama, "svd", ratio=0.3)
    after = model_report(llama, targets=["q_proj"], diagnostics=["stable_rank"])
    assert [r["name"] for r in after] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert after[0]["rank"] == 4 and set(after[0]) == {"name", "shape", "rank", "stable_rank"}
    with pytest.raises(RankwiseError, match="matched no"):
        model_report(llama, targets=["nothing"])
    with pytest.raises(RankwiseError, match="unknown diagnostic 'rankme'; known: effective_rank"):
        model_report(llama, diagnostics=["rankme"])
    with pytest.raises(RankwiseError, match="'intruder_dimensions' is not a Diagnostic; it is one of update_report"):
        model_report(llama, diagnostics=["intruder_dimensions"])
    with pytest.raises(RankwiseError, match="options given for diagnostics not in this report: energy_rank"):
        model_report(llama, diagnostics=["stable_rank"], options={"energy_rank": {"share": 0.5}})
    with pytest.raises(RankwiseError, match="share must be"):
        model_report(llama, options={"energy_rank": {"share": 2.0}})


def test_reports_read_adapter_layers_as_base_plus_update(llama):
    """An adapted model is reported through the weights it applies: the base plus the update."""
    import copy

    import rankwise

    base = copy.deepcopy(llama)
    rankwise.adapt(llama, "lora", rank=4, targets=["q_proj", "v_proj"])
    for layer in rankwise.adapters.adapter_layers(llama).values():
        with torch.no_grad():
            layer.lora_B.normal_()  # a non-zero update
    rows = {r["name"]: r for r in model_report(llama, diagnostics=["frobenius_norm"])}
    assert "model.layers.0.self_attn.q_proj" in rows and "model.layers.0.self_attn.q_proj.base" not in rows
    updates = {r["name"]: r for r in update_report(base, llama, targets=["q_proj", "v_proj"])}
    merged = rankwise.unload(copy.deepcopy(llama))
    for name, row in updates.items():
        dense = merged.get_submodule(name).weight.detach()
        delta = dense - base.get_submodule(name).weight.detach()
        assert rows[name]["frobenius_norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
        assert row["update_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
        assert row["update_stable_rank"] <= 4 + 1e-6  # a rank-4 update
    untouched = update_report(base, llama, targets=["o_proj"])
    assert all(r["update_norm"] == 0 and r["update_stable_rank"] is None for r in untouched)
