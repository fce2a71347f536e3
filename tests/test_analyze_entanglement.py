"""Artificial entanglement: profiles of matrices and MPS with known answers, the laws, attention on text."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.analyze import attention_entanglement, attention_matrix, entanglement_profile, fit_entanglement_law
from rankwise.linalg.shapes import prime_factors
from rankwise.analyze.tensor_network import contract, operator_matrix
from rankwise.errors import RankwiseError


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def page_entropy(d_small: int, d_large: int) -> float:
    """Page's mean entanglement entropy of a random pure state on C^m (x) C^n, m <= n (nats)."""
    m, n = sorted((d_small, d_large))
    return sum(1.0 / k for k in range(n + 1, m * n + 1)) - (m - 1) / (2 * n)


class MpsLayer:
    """A stand-in for the ``mps`` adapter: anything with ``mps_cores()`` is read as an MPS."""

    def __init__(self, cores):
        self.cores = cores

    def mps_cores(self):
        return self.cores


def random_cores(physical, bonds, seed=0):
    """Non-canonical cores: Gaussian, with wildly different scales per core."""
    edges = [1, *bonds, 1]
    return [gaussian(edges[k], *p, edges[k + 1], seed=seed + k) * 10.0 ** (k - 1) for k, p in enumerate(physical)]


# ----- known answers ----------------------------------------------------------------------------


def test_prime_factors():
    assert prime_factors(128) == (2,) * 7 and prime_factors(384) == (2,) * 7 + (3,)
    assert prime_factors(1) == () and prime_factors(97) == (97,) and prime_factors(360) == (2, 2, 2, 3, 3, 5)


def test_kronecker_product_has_zero_entropy_at_the_cut_between_its_factors():
    a, b = gaussian(4, 4, seed=1), gaussian(8, 8, seed=2)
    profile = entanglement_profile(torch.kron(a, b), layout="interleaved")
    # sites (2x2, 2x2 | 2x2, 2x2, 2x2): A lives on the first two, B on the last three
    assert profile.site_dims == (4, 4, 4, 4, 4) and profile.row_factors == (2,) * 5
    assert profile.entropies[1] == pytest.approx(0.0, abs=1e-12) and profile.bond_dims[1] == 1
    assert min(profile.entropies[0], profile.entropies[2], profile.entropies[3]) > 0.1
    # the same with the two factors as the two sites
    two = entanglement_profile(torch.kron(a, b), row_factors=(4, 8), col_factors=(4, 8), layout="interleaved")
    assert two.site_dims == (16, 64) and two.entropies == pytest.approx((0.0,), abs=1e-12)
    # and A (x) B (x) C has zero entropy at both factor cuts
    c = gaussian(2, 2, seed=3)
    three = entanglement_profile(torch.kron(torch.kron(a, c), b), row_factors=(4, 2, 8), col_factors=(4, 2, 8),
                                 layout="interleaved")
    assert three.entropies == pytest.approx((0.0, 0.0), abs=1e-12)


def test_random_gaussian_matrix_follows_the_volume_law_page_curve():
    profile = entanglement_profile(gaussian(64, 64))  # 12 qubit-like sites, rows then columns
    assert profile.site_dims == (2,) * 12 and profile.cuts == tuple(range(1, 12))
    page = [page_entropy(2**l, 2 ** (12 - l)) for l in profile.cuts]
    # one sample: fluctuations around Page's mean shrink with the dimension (~1e-2 here)
    assert profile.entropies == pytest.approx(page, abs=0.03)
    assert profile.ceiling == pytest.approx([math.log(2) * min(l, 12 - l) for l in profile.cuts])
    law = fit_entanglement_law(profile)
    assert law.law == "volume" and law.best.r2 > 0.98
    assert law.best.parameters["slope"] == pytest.approx(1.0, abs=0.15)  # fills the ceiling up to Page's deficit
    assert law.fits["volume"].bic < law.fits["log"].bic < law.fits["area"].bic
    assert profile.valley == 0.0


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_a_rank_r_update_has_entropy_at_most_ln_r_at_the_out_in_cut(rank):
    """In the default layout the middle cut is out | in, where the Schmidt values are the singular
    values of W: S <= ln r, with equality when the r singular values are equal."""
    update = gaussian(64, rank, seed=rank) @ gaussian(rank, 64, seed=10 + rank)
    profile = entanglement_profile(update)
    centre = profile.entropies[5]  # 6 row legs | 6 column legs
    assert centre <= math.log(rank) + 1e-9 and profile.bond_dims[5] == rank
    q1, _ = torch.linalg.qr(gaussian(64, rank, seed=1))
    q2, _ = torch.linalg.qr(gaussian(64, rank, seed=2))
    flat = entanglement_profile(q1 @ q2.T)
    assert flat.entropies[5] == pytest.approx(math.log(rank), abs=1e-10)
    # cuts inside the row (or column) legs see the factors' own entanglement, not bounded by ln r,
    # but by ln r plus the smaller side: the dip in the middle is the "entanglement valley"
    for cut, entropy in zip(profile.cuts, profile.entropies):
        inside = min(cut, 6 - cut) if cut <= 6 else min(cut - 6, 12 - cut)
        assert entropy <= math.log(rank) + inside * math.log(2) + 1e-9
    if rank <= 3:
        assert profile.valley > 0.3


def test_operator_mps_of_bond_dimension_r_has_entropy_at_most_ln_r_at_every_cut():
    cores = random_cores([(2, 2)] * 5, [3, 3, 3, 3])
    matrix = operator_matrix(cores)  # 32 x 32
    profile = entanglement_profile(matrix, layout="interleaved")
    assert all(s <= math.log(3) + 1e-9 for s in profile.entropies)
    assert all(d <= 3 for d in profile.bond_dims)
    assert entanglement_profile(cores).entropies == pytest.approx(profile.entropies, abs=1e-9)


def test_non_canonical_mps_gives_the_profile_of_its_contracted_tensor():
    cores = random_cores([(2,), (3,), (2,), (4,), (2,)], [2, 5, 4, 2])
    full = contract(cores)
    dense = entanglement_profile(full.reshape(6, 16), row_factors=(2, 3), col_factors=(2, 4, 2))
    from_cores = entanglement_profile(cores)
    assert from_cores.layout == "mps" and from_cores.site_dims == (2, 3, 2, 4, 2)
    assert from_cores.entropies == pytest.approx(dense.entropies, abs=1e-10)
    assert from_cores.bond_dims == dense.bond_dims
    # a gauge change on a bond (G_k X, X^-1 G_{k+1}) changes the cores, not the state
    x = gaussian(5, 5, seed=9) + 3 * torch.eye(5, dtype=torch.float64)
    gauged = list(cores)
    gauged[1] = torch.einsum("adb,bc->adc", cores[1], x)
    gauged[2] = torch.einsum("ab,bdc->adc", torch.linalg.inv(x), cores[2])
    assert torch.allclose(contract(gauged), full, rtol=1e-9, atol=1e-9 * float(full.abs().max()))
    assert entanglement_profile(gauged).entropies == pytest.approx(from_cores.entropies, abs=1e-10)


def test_objects_with_mps_cores_are_read_directly_operator_cores_included():
    cores = random_cores([(2, 3), (4, 2), (2, 2)], [3, 4], seed=5)
    layer = MpsLayer(cores)
    matrix = operator_matrix(cores)
    assert matrix.shape == (16, 12)
    # W[(i1 i2 i3), (j1 j2 j3)] = G1[:, i1, j1, :] G2[:, i2, j2, :] G3[:, i3, j3, :]
    entry = (cores[0][:, 1, 2, :] @ cores[1][:, 3, 0, :] @ cores[2][:, 1, 1, :]).item()
    assert matrix[1 * 8 + 3 * 2 + 1, 2 * 4 + 0 * 2 + 1].item() == pytest.approx(entry, rel=1e-12)
    profile = entanglement_profile(layer)
    assert profile.site_dims == (6, 8, 4) and profile.layout == "mps"
    dense = entanglement_profile(matrix, row_factors=(2, 4, 2), col_factors=(3, 2, 2), layout="interleaved")
    assert profile.entropies == pytest.approx(dense.entropies, abs=1e-10)
    assert entanglement_profile(cores).entropies == profile.entropies  # a plain list of cores too


def test_entropy_is_natural_log_of_normalised_schmidt_values():
    # diag(3, 4) as 2 sites of dim 2 (rows | columns): Schmidt values 4, 3 -> p = 16/25, 9/25
    profile = entanglement_profile(torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64)))
    p = [16 / 25, 9 / 25]
    assert profile.entropies == pytest.approx((-sum(x * math.log(x) for x in p),), rel=1e-12)
    assert entanglement_profile(5.0 * torch.eye(2)).entropies == pytest.approx((math.log(2),), rel=1e-6)


def test_profiles_reject_bad_input():
    with pytest.raises(RankwiseError, match=r"row_factors \(2, 3\) multiply to 6, not the dimension 8"):
        entanglement_profile(torch.eye(8), row_factors=(2, 3))
    with pytest.raises(RankwiseError, match="positive integers"):
        entanglement_profile(torch.eye(8), col_factors=(2, 0, 4))
    with pytest.raises(RankwiseError, match="layout must be one of"):
        entanglement_profile(torch.eye(8), layout="columns_first")
    with pytest.raises(RankwiseError, match="all-zero"):
        entanglement_profile(torch.zeros(4, 4))
    with pytest.raises(RankwiseError, match="one site and no cut"):
        entanglement_profile(torch.eye(3)[:1], row_factors=(1,), col_factors=(3,), layout="interleaved")
    cores = random_cores([(2,), (2,), (2,)], [2, 2])
    with pytest.raises(RankwiseError, match="keeps its own sites"):
        entanglement_profile(cores, layout="interleaved")
    with pytest.raises(RankwiseError, match="bond 1 does not match"):
        entanglement_profile([cores[0], torch.randn(3, 2, 2), cores[2]])
    with pytest.raises(RankwiseError, match="boundary bonds"):
        entanglement_profile([torch.randn(2, 2, 2), cores[1], cores[2]])
    with pytest.raises(RankwiseError, match="must all be 3-D .* or all 4-D"):
        entanglement_profile([cores[0], torch.randn(2, 2, 2, 2), torch.randn(2, 2, 1)])


# ----- the laws ------------------------------------------------------------------------------------


def test_fit_entanglement_law_names_constructed_laws():
    sites = 14
    cuts = range(1, sites)
    volume = [0.69 * min(l, sites - l) for l in cuts]
    cardy = [(1.0 / 6) * math.log((2 * sites / math.pi) * math.sin(math.pi * l / sites)) + 0.3 for l in cuts]
    area = [0.8 + 0.01 * (-1) ** l for l in cuts]
    assert fit_entanglement_law(volume).law == "volume"
    assert fit_entanglement_law(volume).best.parameters["slope"] == pytest.approx(0.69, rel=1e-9)
    fit = fit_entanglement_law(cardy)
    assert fit.law == "log" and fit.best.parameters["central_charge"] == pytest.approx(1.0, rel=1e-9)
    assert fit.best.r2 == pytest.approx(1.0) and fit.best.rmse < 1e-12
    assert fit_entanglement_law(area).law == "area"
    assert fit_entanglement_law([0.0] * 9).law == "area"  # a product state
    assert fit_entanglement_law([-x for x in volume]).law == "area"  # a decreasing slope is no volume law
    with pytest.raises(RankwiseError, match="at least 3 cuts"):
        fit_entanglement_law([0.1, 0.2])


def test_fit_to_dict_and_profile_to_dict_are_json_ready():
    import json

    profile = entanglement_profile(gaussian(16, 16))
    json.dumps({"profile": profile.to_dict(), "law": fit_entanglement_law(profile).to_dict()})


# ----- external entanglement: attention on text ----------------------------------------------------


def test_attention_entanglement_reads_the_eager_attention_and_restores_the_model(llama):
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    llama.train()
    before = llama.config._attn_implementation
    matrix = attention_matrix(llama, ids, layer=1, head=2)
    assert llama.training and llama.config._attn_implementation == before
    assert matrix.shape == (32, 32)  # the largest power of two <= 40 tokens
    assert torch.allclose(matrix.sum(dim=1), torch.ones(32), atol=1e-5)  # softmax rows
    assert torch.equal(torch.triu(matrix, diagonal=1), torch.zeros(32, 32))  # causal
    profile = attention_entanglement(llama, ids, layer=1, head=2)
    assert profile.site_dims == (2,) * 10
    assert profile.entropies == pytest.approx(entanglement_profile(matrix).entropies, abs=1e-6)
    assert attention_matrix(llama, ids, layer=0, head=0, length=16).shape == (16, 16)


def test_attention_entanglement_on_an_encoder_and_with_a_tokenizer(minilm, minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    text = "The quick brown fox jumps over the lazy dog. " * 4
    matrix = attention_matrix(minilm, text, layer=0, head=0, tokenizer=tokenizer)
    assert matrix.shape == (32, 32) and torch.allclose(matrix.sum(dim=1), torch.ones(32), atol=1e-5)
    assert (torch.triu(matrix, diagonal=1) > 0).any()  # bidirectional
    assert attention_entanglement(minilm, text, 5, 11, tokenizer=tokenizer).num_sites == 10


def test_attention_entanglement_refuses_bad_requests(llama):
    ids = torch.arange(20)
    before = llama.config._attn_implementation
    with pytest.raises(RankwiseError, match="needs tokenizer"):
        attention_entanglement(llama, "some text", 0, 0)
    with pytest.raises(RankwiseError, match=r"layer must be an integer in \[0, 1\]"):
        attention_entanglement(llama, ids, 2, 0)
    with pytest.raises(RankwiseError, match=r"head must be an integer in \[0, 3\]"):
        attention_entanglement(llama, ids, 0, 4)
    with pytest.raises(RankwiseError, match=r"length must be an integer in \[4, 20\]"):
        attention_entanglement(llama, ids, 0, 0, length=32)
    assert llama.config._attn_implementation == before  # restored after the failed calls too
