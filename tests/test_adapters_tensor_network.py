"""MPS adaptation: contracting the cores is the dense update (checked with rankwise.analyze's own
contraction), the site-by-site forward equals it, the init is a left-canonical MPS with a zero last
core, at full bond dimension the MPS fits any matrix exactly (below it, not better than the TT-SVD
bound), and ``entanglement_profile`` reads the adapter's cores."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankwise.adapters import adapt, adapter_layers, export_peft
from rankwise.adapters.mps import automatic_sites, balanced_factors, bond_dimensions
from rankwise.analyze import entanglement_profile
from rankwise.analyze.tensor_network import dense_schmidt_values, operator_matrix
from rankwise.errors import RankwiseError


class OneLayer(nn.Module):
    def __init__(self, out_features: int, in_features: int, dtype=torch.float32, seed=0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(in_features, out_features, bias=False, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def mps_layer(out_features=8, in_features=12, rank=3, dtype=torch.float64, **options):
    model = adapt(OneLayer(out_features, in_features, dtype), "mps", rank=rank, alpha=2 * rank, targets=["proj"],
                  **options)
    return model, next(iter(adapter_layers(model).values()))


def randomise(layer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for core in layer.cores:
            core.copy_(torch.randn(core.shape, generator=generator, dtype=core.dtype))


def test_balanced_factors_and_the_automatic_split():
    assert balanced_factors(32, 3) == (4, 4, 2)
    assert balanced_factors(64, 3) == (4, 4, 4)
    assert balanced_factors(11008, 3) == (43, 16, 16)
    assert balanced_factors(7, 3) == (7, 1, 1)
    assert automatic_sites(32, 64) == 4 and automatic_sites(6, 64) == 2 and automatic_sites(7, 9) == 2
    # bonds are capped by the Schmidt rank each cut can carry: sites of dimension 4, 16, 4
    assert bond_dimensions([4, 16, 4], 100) == [1, 4, 4, 1]
    assert bond_dimensions([4, 16, 4], 2) == [1, 2, 2, 1]


@pytest.mark.parametrize("layout", ["interleaved", "rows_then_columns"])
def test_cores_contract_to_the_dense_update_in_c_order(layout):
    model, layer = mps_layer(row_factors=(2, 4), col_factors=(3, 4), layout=layout)
    randomise(layer)
    cores = layer.mps_cores()
    assert all(c.ndim == 4 for c in cores) and cores[0].shape[0] == cores[-1].shape[-1] == 1
    expected_sites = [(2, 3), (4, 4)] if layout == "interleaved" else [(2, 1), (4, 1), (1, 3), (1, 4)]
    assert [tuple(c.shape[1:3]) for c in cores] == expected_sites
    torch.testing.assert_close(operator_matrix(cores), layer.delta_weight().detach(), atol=1e-12, rtol=0)
    # one entry by hand: W[(i1, i2), (j1, j2)] = s * G1[0, i1, j1] G2[:, i2, j2, 0] (interleaved)
    if layout == "interleaved":
        g1, g2 = layer.cores
        i1, i2, j1, j2 = 1, 3, 2, 1
        entry = layer.scaling * (g1[0, i1, j1] @ g2[:, i2, j2, 0])
        torch.testing.assert_close(layer.delta_weight()[i1 * 4 + i2, j1 * 4 + j2], entry, atol=1e-12, rtol=0)


@pytest.mark.parametrize("layout", ["interleaved", "rows_then_columns"])
def test_site_by_site_forward_equals_the_dense_update_and_is_chosen_when_cheaper(layout):
    model, layer = mps_layer(64, 96, rank=4, layout=layout)
    randomise(layer)
    x = torch.randn(2, 3, 96, dtype=torch.float64)
    dense = x @ layer.delta_weight().detach().T
    torch.testing.assert_close(layer.contract_input(x), dense, atol=1e-9, rtol=1e-9)
    assert layer.sequential_cost(6) < layer.dense_cost(6)  # few tokens: sweeping beats forming 64 x 96
    layer.delta_weight = None  # the forward must not form the update here
    torch.testing.assert_close(model(x) - x @ model.proj.base.weight.T, dense, atol=1e-9, rtol=1e-9)


def test_init_is_left_canonical_with_a_zero_last_core():
    model, layer = mps_layer(64, 96, rank=5, dtype=torch.float64)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    for core in layer.cores[:-1]:
        left, m, n, right = core.shape
        matrix = core.detach().reshape(left * m * n, right)
        torch.testing.assert_close(matrix.T @ matrix, torch.eye(right, dtype=matrix.dtype), atol=1e-12, rtol=0)
    # the left environment is an isometry, so ||dW||_F = s ||G_N||_F for any last core
    with torch.no_grad():
        layer.cores[-1].normal_()
    norm = torch.linalg.matrix_norm(layer.delta_weight().detach())
    assert norm.item() == pytest.approx(layer.scaling * layer.cores[-1].detach().norm().item(), rel=1e-10)


def fit(layer, target, steps=300):
    """Least squares ``||dW - T||_F`` over all cores by L-BFGS (fp64); returns the relative error."""
    randomise(layer, seed=1)
    with torch.no_grad():
        for core in layer.cores:
            core.mul_(0.5)
    optimizer = torch.optim.LBFGS(list(layer.cores), lr=1, max_iter=steps, tolerance_grad=1e-14,
                                  tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (layer.delta_weight() - target).square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (torch.linalg.matrix_norm(layer.delta_weight() - target) / torch.linalg.matrix_norm(target)).item()


def test_full_bond_dimension_fits_a_random_matrix_exactly_and_less_cannot():
    target = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    factors = {"row_factors": (2, 2, 2), "col_factors": (2, 2, 2)}  # three sites of dimension 4
    _, full = mps_layer(8, 8, rank=4, **factors)
    assert full.bonds == [1, 4, 4, 1]  # the Schmidt limit of both cuts
    assert fit(full, target) < 1e-6
    # at chi = 3 the error is at least the discarded Schmidt weight of the worse cut
    _, truncated = mps_layer(8, 8, rank=3, **factors)
    site_tensor = target.reshape(2, 2, 2, 2, 2, 2).permute(0, 3, 1, 4, 2, 5)  # interleaved legs (i_k, j_k)
    schmidt = dense_schmidt_values(site_tensor.contiguous(), [4, 4, 4])
    bound = max(math.sqrt(float(s[3:].square().sum())) for s in schmidt) / target.norm().item()
    assert bound > 0.05
    assert fit(truncated, target) >= bound * (1 - 1e-6)


def test_entanglement_profile_reads_the_adapters_cores():
    model, layer = mps_layer(64, 96, rank=3, layout="interleaved")
    randomise(layer)
    profile = entanglement_profile(layer)
    assert profile.layout == "mps" and profile.site_dims == tuple(m * n for m, n in layer.physical)
    # the same entropies as the dense update read with the same sites
    dense = entanglement_profile(layer.delta_weight().detach(), row_factors=[m for m, _ in layer.physical],
                                 col_factors=[n for _, n in layer.physical], layout="interleaved")
    assert profile.entropies == pytest.approx(dense.entropies, abs=1e-9)
    assert all(s <= math.log(3) + 1e-9 for s in profile.entropies)  # S <= ln chi at every bond
    assert max(profile.bond_dims) <= 3


def test_rows_then_columns_bounds_the_matrix_rank_by_chi_and_interleaved_does_not():
    _, bottleneck = mps_layer(16, 16, rank=2, layout="rows_then_columns")
    _, interleaved = mps_layer(16, 16, rank=2, layout="interleaved")
    randomise(bottleneck)
    randomise(interleaved)
    assert torch.linalg.matrix_rank(bottleneck.delta_weight().detach()) == 2
    assert torch.linalg.matrix_rank(interleaved.delta_weight().detach()) > 2


@pytest.mark.parametrize(
    "options, message",
    [({"row_factors": (3, 3)}, r"row_factors \(3, 3\) multiply to 9, not 8"),
     ({"sites": 3, "col_factors": (3, 4)}, "disagree on the number of factors"),
     ({"row_factors": (8,), "col_factors": (12,)}, "at least 2 factors"),
     ({"layout": "zigzag"}, "option layout must be one of")],
)
def test_bad_site_options_are_refused(options, message):
    model = OneLayer(8, 12)
    with pytest.raises(RankwiseError, match=message):
        adapt(model, "mps", rank=2, targets=["proj"], **options)
    assert type(model.proj) is nn.Linear


def test_mps_exports_as_the_best_rank_k_lora_with_its_error(tmp_path):
    model, layer = mps_layer(64, 96, rank=4, dtype=torch.float32)
    randomise(layer)
    report = export_peft(model, tmp_path)
    entry = report["modules"]["proj"]
    assert entry["source"] == "svd" and not entry["exact"] and entry["relative_error"] > 1e-3
    assert export_peft(model, tmp_path / "full", rank=64)["exact"]
