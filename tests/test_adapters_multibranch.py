"""Multi-branch and dimension-reduced adapters: Hydra and LaMDA on constructed inputs.

Hydra: the layer output against the paper's two-branch formula written out by hand (and, on a
bias-free layer, against the authors' composition ``dense(x) + par(x) + seq(dense(x))``), the
merged weight ``(I + s B_s A_s) W0 + s B_p A_p``, its exact inversion after a large update,
the refusal to unmerge a singular sequential map, and the exact rank-``(r + r_s)`` PEFT export.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.adapters import adapt, adapter_layers, export_peft, merge, unmerge
from rankwise.errors import RankwiseError

ATOL = 1e-5


def linear_model(n_in: int = 12, n_out: int = 10, bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out, bias=bias))


def randomise(layer: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=generator))


# ----- Hydra -----------------------------------------------------------------------------------


def hydra_layer(bias: bool = True, rank: int = 3, alpha: float = 6.0, **options):
    model = linear_model(bias=bias)
    original = model[0].weight.detach().clone(), None if model[0].bias is None else model[0].bias.detach().clone()
    adapt(model, "hydra", rank=rank, alpha=alpha, targets=["0"], **options)
    layer = adapter_layers(model)["0"]
    randomise(layer)
    return model, layer, original


@pytest.mark.parametrize("bias", [True, False])
def test_hydra_output_is_the_two_branch_formula(bias):
    model, layer, (weight, b) = hydra_layer(bias=bias, sequential_rank=2)
    x = torch.randn(5, 12)
    s = 6.0 / 3
    pretrained = x @ weight.T
    expected = pretrained + s * (x @ layer.hydra_par_A.T @ layer.hydra_par_B.T) \
        + s * (pretrained @ layer.hydra_seq_A.T @ layer.hydra_seq_B.T)
    if b is not None:
        expected = expected + b  # the sequential branch sees W0 x without the bias (documented deviation)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    assert layer.hydra_seq_A.shape == (2, 10) and layer.hydra_seq_B.shape == (10, 2)


def test_hydra_matches_the_authors_composition_on_a_bias_free_layer():
    """``dense(x) + par(x) + seq(dense(x))`` with plain Linear branches, scaling 1 (alpha = rank)."""
    model, layer, (weight, _) = hydra_layer(bias=False, alpha=3.0)
    dense = nn.Linear(12, 10, bias=False)
    par = nn.Sequential(nn.Linear(12, 3, bias=False), nn.Linear(3, 10, bias=False))
    seq = nn.Sequential(nn.Linear(10, 3, bias=False), nn.Linear(3, 10, bias=False))
    with torch.no_grad():
        dense.weight.copy_(weight)
        par[0].weight.copy_(layer.hydra_par_A)
        par[1].weight.copy_(layer.hydra_par_B)
        seq[0].weight.copy_(layer.hydra_seq_A)
        seq[1].weight.copy_(layer.hydra_seq_B)
        x = torch.randn(7, 12)
        hidden = dense(x)
        torch.testing.assert_close(model(x), hidden + par(x) + seq(hidden), atol=ATOL, rtol=0)


def test_hydra_init_is_kaiming_down_and_zero_up():
    model = linear_model()
    adapt(model, "hydra", rank=3, targets=["0"])
    layer = adapter_layers(model)["0"]
    assert torch.count_nonzero(layer.hydra_par_B) == 0 and torch.count_nonzero(layer.hydra_seq_B) == 0
    bound_par, bound_seq = 1 / 12 ** 0.5, 1 / 10 ** 0.5  # kaiming-uniform(a=sqrt 5) = U(-1/sqrt(fan_in), ..)
    assert 0 < layer.hydra_par_A.abs().max() <= bound_par and 0 < layer.hydra_seq_A.abs().max() <= bound_seq


def test_hydra_merge_writes_the_paper_weight_and_unmerge_inverts_a_large_update():
    model, layer, (weight, _) = hydra_layer(sequential_rank=2)
    randomise(layer, scale=1.0)  # far from the identity: the Woodbury inversion does real work
    s = 2.0
    expected = (torch.eye(10) + s * layer.hydra_seq_B @ layer.hydra_seq_A) @ weight \
        + s * layer.hydra_par_B @ layer.hydra_par_A
    x = torch.randn(4, 12)
    with torch.no_grad():
        before = model(x)
        merge(model)
        torch.testing.assert_close(model[0].base.weight, expected.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.original_weight(), weight, atol=1e-5, rtol=0)
        unmerge(model)
        torch.testing.assert_close(model[0].base.weight, weight, atol=1e-5, rtol=0)


def test_hydra_refuses_to_unmerge_a_singular_sequential_map_and_leaves_the_weight():
    model, layer, _ = hydra_layer(rank=1, alpha=2.0, sequential_rank=1)
    with torch.no_grad():
        # s A_s B_s = -1: I + s B_s A_s projects out e_0, so W0's first row is lost in W'
        layer.hydra_seq_A.zero_()[0, 0] = 1.0
        layer.hydra_seq_B.zero_()[0, 0] = -1.0 / layer.scaling
    merge(model)
    merged = model[0].base.weight.detach().clone()
    torch.testing.assert_close(merged[0], (2.0 * layer.hydra_par_B[0, 0] * layer.hydra_par_A[0]).detach(),
                               atol=1e-6, rtol=0)
    with pytest.raises(RankwiseError, match="I \\+ s A_s B_s is singular"):
        unmerge(model)
    assert torch.equal(model[0].base.weight, merged) and layer.merged


def test_hydra_sequential_rank_above_the_output_size_is_refused():
    model = linear_model()
    with pytest.raises(RankwiseError, match="sequential_rank=11 exceeds the layer's output size 10"):
        adapt(model, "hydra", rank=2, targets=["0"], sequential_rank=11)
    assert isinstance(model[0], nn.Linear)


def test_hydra_exports_exactly_as_a_rank_r_plus_r_s_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model, layer, _ = hydra_layer(bias=False, sequential_rank=2)
    report = export_peft(model, tmp_path)
    assert report["exact"] and report["modules"]["0"]["rank"] == 5
    assert report["modules"]["0"]["source"] != "svd"
    fresh = linear_model(bias=False)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=ATOL, rtol=0)
