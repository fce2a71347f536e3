"""Spectral diagnostics: the registry's table of known answers, constructed matrices, real vs random weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rankwise.analyze
from cases import collect
from cases.analyze_ranks_norms import SPREAD, rankme, with_spectrum
from rankwise.analyze import (
    DIAGNOSTICS,
    effective_rank,
    effective_rank_of_spectrum,
    method_options,
    model_report,
    spectrum,
    stable_rank,
    stable_rank_of_spectrum,
)
from rankwise.compress import compress
from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear

CASES = collect("analyze_")
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def one_layer(weight: torch.Tensor) -> nn.Sequential:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


# ----- the table: every registered diagnostic, known answers --------------------------------


def test_every_registered_diagnostic_has_a_row():
    missing = set(DIAGNOSTICS.names()) - {c.diagnostic for c in CASES}
    assert not missing, f"registered diagnostics without a row in tests/cases/analyze_*.py: {sorted(missing)}"


@pytest.mark.parametrize("name", DIAGNOSTICS.names())
def test_every_diagnostic_is_a_public_function_without_options_of_its_own(name):
    # model_report's column, the registry name and rankwise.analyze.<name> are one thing
    assert callable(getattr(rankwise.analyze, name))
    assert method_options(name) == {}
    with pytest.raises(RankwiseError, match=rf"diagnostic '{name}': unknown option\(s\) eps"):
        DIAGNOSTICS.get(name)(method=name, eps=1e-3)


@cases
def test_known_answer_through_the_registry_and_the_public_function(case):
    matrix = case.matrix()
    measured = DIAGNOSTICS.get(case.diagnostic)().measure(matrix, spectrum(matrix))
    assert measured == pytest.approx(case.expected, rel=case.rel, abs=case.abs)
    assert getattr(rankwise.analyze, case.diagnostic)(matrix) == pytest.approx(case.expected, rel=case.rel, abs=case.abs)


@cases
def test_model_report_gives_the_known_answer(case):
    matrix = case.matrix()
    (row,) = model_report(one_layer(matrix), diagnostics=[case.diagnostic])
    assert row["name"] == "0" and row["shape"] == tuple(matrix.shape) and row["rank"] == min(matrix.shape)
    assert set(row) == {"name", "shape", "rank", case.diagnostic}
    assert row[case.diagnostic] == pytest.approx(case.expected, rel=case.rel, abs=case.abs)


@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_identity(n):
    eye = torch.eye(n)
    assert torch.equal(spectrum(eye), torch.ones(n))
    assert effective_rank(eye) == pytest.approx(rankme([1.0] * n), rel=1e-9)
    assert effective_rank(eye) == pytest.approx(n, abs=1e-4 * n)
    assert stable_rank(eye) == pytest.approx(n, rel=1e-6)
    assert spectrum(torch.diag(torch.tensor([3.0, 4.0]))).tolist() == [4.0, 3.0]


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


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.ones(5), torch.empty(0, 3), "matrix"])
def test_bad_inputs_raise(bad):
    with pytest.raises(RankwiseError):
        stable_rank(bad)
    with pytest.raises(RankwiseError):
        effective_rank(bad)


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


def test_model_report_reports_every_diagnostic_per_layer_with_known_values():
    """Two layers with constructed spectra, one dense and one factorised: every column known."""
    model = nn.Sequential(nn.Linear(6, 10, bias=False, dtype=torch.float64), nn.Linear(10, 10, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.copy_(with_spectrum(SPREAD, 10, 6))
        model[1].weight.copy_(with_spectrum([3.0, 1.0], 10, 10, seed=2))
    compress(model, "svd", ratio=0.45, targets=["1"])  # rank floor(0.45 * 100 / 20) = 2 keeps the whole spectrum
    rows = model_report(model)
    assert [(r["name"], r["shape"], r["rank"]) for r in rows] == [("0", (10, 6), 6), ("1", (10, 10), 2)]
    expected = [
        {"effective_rank": rankme(SPREAD + [0.0, 0.0]), "stable_rank": (81 + 25 + 4 + 0.25) / 81,
         "spectral_norm": 9.0, "frobenius_norm": math.sqrt(81 + 25 + 4 + 0.25)},
        {"effective_rank": rankme([3.0, 1.0] + [0.0] * 8), "stable_rank": 10 / 9, "spectral_norm": 3.0,
         "frobenius_norm": math.sqrt(10)},
    ]
    # The dense float64 layer is exact to rounding. The factorised one is reported through its
    # product, formed in float32: its eight null singular values come out near 1e-7 * sigma_1
    # instead of 0, the size of RankMe's epsilon, which moves the effective rank by ~1e-6.
    tolerances = [1e-9, 1e-5]
    for row, values, rel in zip(rows, expected, tolerances):
        assert set(row) == {"name", "shape", "rank", *DIAGNOSTICS.names()}
        assert {k: row[k] for k in values} == pytest.approx(values, rel=rel)


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
