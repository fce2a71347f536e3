"""Spectral diagnostics: known answers on constructed matrices, real vs random weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankwise.analyze import (
    effective_rank,
    effective_rank_of_spectrum,
    model_report,
    spectrum,
    stable_rank,
    stable_rank_of_spectrum,
)
from rankwise.analyze.ranks import RANKME_EPS
from rankwise.compress import compress
from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear


def rankme(singular_values: list[float]) -> float:
    """The RankMe formula written out in plain Python floats."""
    total = sum(singular_values)
    p = [s / total + RANKME_EPS for s in singular_values]
    return math.exp(-sum(q * math.log(q) for q in p))


@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_identity(n):
    eye = torch.eye(n)
    assert torch.equal(spectrum(eye), torch.ones(n))
    assert effective_rank(eye) == pytest.approx(rankme([1.0] * n), rel=1e-9)
    assert effective_rank(eye) == pytest.approx(n, abs=1e-4 * n)
    assert stable_rank(eye) == pytest.approx(n, rel=1e-6)


def test_rank_one_matrix():
    u, v = torch.randn(12, 1, dtype=torch.float64), torch.randn(1, 7, dtype=torch.float64)
    w = u @ v
    assert stable_rank(w) == pytest.approx(1.0, rel=1e-9)
    # six zero singular values each add about -1e-7 log(1e-7)
    assert effective_rank(w) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(w) == pytest.approx(rankme([spectrum(w)[0].item()] + [0.0] * 6), rel=1e-6)


def test_diag_3_4():
    w = torch.diag(torch.tensor([3.0, 4.0]))
    assert spectrum(w).tolist() == [4.0, 3.0]
    assert stable_rank(w) == pytest.approx(25 / 16, rel=1e-7)
    p = torch.tensor([4 / 7, 3 / 7], dtype=torch.float64) + RANKME_EPS
    assert effective_rank(w) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-7)
    assert 1 < effective_rank(w) < 2


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


def test_model_report_dense_and_factorized(llama):
    rows = model_report(llama)
    names = [n for n, m in llama.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert [r["name"] for r in rows] == names
    first = rows[0]
    weight = llama.get_submodule(first["name"]).weight
    assert first["shape"] == tuple(weight.shape) and first["rank"] == min(weight.shape)
    assert first["stable_rank"] == pytest.approx(stable_rank(weight), rel=1e-6)
    assert first["effective_rank"] == pytest.approx(effective_rank(weight), rel=1e-6)
    assert first["frobenius_norm"] == pytest.approx(weight.norm().item(), rel=1e-5)
    assert first["spectral_norm"] == pytest.approx(spectrum(weight)[0].item(), rel=1e-6)

    compress(llama, "svd", ratio=0.3)
    after = model_report(llama, targets=["q_proj"])
    assert [r["name"] for r in after] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert after[0]["rank"] == 4 and after[0]["effective_rank"] <= 4 + 1e-3
    with pytest.raises(RankwiseError, match="matched no"):
        model_report(llama, targets=["nothing"])
