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

from conftest import randomise_trainable as randomise
from rankwise.adapters import adapt, adapter_layers, export_peft, merge, unmerge
from rankwise.errors import RankwiseError

ATOL = 1e-5


def linear_model(n_in: int = 12, n_out: int = 10, bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out, bias=bias))


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


# ----- LaMDA -----------------------------------------------------------------------------------


def lamda_layer(rank: int = 3, alpha: float = 6.0, **options):
    model = linear_model()
    weight = model[0].weight.detach().clone()
    adapt(model, "lamda", rank=rank, alpha=alpha, targets=["0"], **options)
    return model, adapter_layers(model)["0"], weight


def test_lamda_svd_init_spans_the_principal_subspaces_with_a_zero_core():
    model, layer, weight = lamda_layer()
    u, s, vh = torch.linalg.svd(weight.double())
    assert torch.count_nonzero(layer.lamda_S) == 0
    best = (u[:, :3] * s[:3]) @ vh[:3]  # B diag(sigma_r) A is W0's best rank-3 approximation (sign-free check)
    torch.testing.assert_close((layer.lamda_B.double() * s[:3]) @ layer.lamda_A.double(), best, atol=1e-5, rtol=0)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ weight.T + model[0].base.bias, atol=ATOL, rtol=0)


def test_lamda_random_init_is_the_release_lora_with_a_square_core():
    _, layer, _ = lamda_layer(init="random")
    assert torch.count_nonzero(layer.lamda_B) == 0
    assert 0 < layer.lamda_A.abs().max() <= 1 / 12 ** 0.5 and 0 < layer.lamda_S.abs().max() <= 1 / 3 ** 0.5


def test_lamda_output_is_W0_x_plus_s_B_S_A_x_and_only_S_and_B_train():
    model, layer, weight = lamda_layer()
    randomise(layer)
    assert not layer.lamda_A.requires_grad and "lamda_A" in dict(layer.named_buffers())
    x = torch.randn(5, 12)
    expected = x @ weight.T + model[0].base.bias + 2.0 * x @ (layer.lamda_B @ layer.lamda_S @ layer.lamda_A).T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lamda_S", "lamda_B"}


def test_lamda_freezes_B_column_by_column_and_adam_cannot_move_a_frozen_column(tmp_path):
    from rankwise.adapters import after_step, load_adapter, save_adapter

    model, layer, _ = lamda_layer(rank=4, freeze_fraction=0.5)
    randomise(layer)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(8, 12), torch.randn(8, 10)
    total, history = 20, []
    for step in range(1, total + 1):
        optimizer.zero_grad(set_to_none=True)
        (model(x) - target).square().mean().backward()
        optimizer.step()
        after_step(model, step=step, total_steps=total, optimizer=optimizer)
        history.append((int(layer.frozen_columns), layer.projection_B().detach().clone()))
        if step == 6:
            save_adapter(model, tmp_path)
            with torch.no_grad():
                expected = model(x)
    # horizon t_i = 0.5 * 20 = 10 steps; column j freezes at step ceil((j + 1) * 10 / 4)
    assert [count for count, _ in history] == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4] + [4] * 10
    for step, (count, columns) in enumerate(history[:-1]):
        later = history[step + 1][1]
        assert torch.equal(later[:, :count], columns[:, :count]), step  # frozen columns never move again
        if count < 4:
            assert not torch.allclose(later[:, count:], columns[:, count:]), step  # the others still train
    assert torch.equal(layer.B_frozen, history[-1][1])
    optimizer.zero_grad(set_to_none=True)
    (model(x) - target).square().mean().backward()
    assert layer.lamda_B.grad is None and layer.lamda_S.grad is not None  # B is out of the graph

    loaded = load_adapter(linear_model(), tmp_path)
    assert int(adapter_layers(loaded)["0"].frozen_columns) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=ATOL, rtol=0)


def test_lamda_schedule_needs_the_total_steps():
    from rankwise.adapters import after_step

    model, _, _ = lamda_layer()
    with pytest.raises(RankwiseError, match="total_steps"):
        after_step(model, step=1, total_steps=0)


def test_lamda_plus_plus_allocation_on_constructed_spectra():
    from rankwise.adapters.lamda import spectral_ranks

    spectra = {
        "concentrated": torch.tensor([1.0, 0.0, 0.0, 0.0]),  # top-2 energy share 1: shortfall 0
        "flat": torch.tensor([1.0, 1.0, 1.0, 1.0]),          # share 1/2: shortfall 1/2
        "decaying": torch.tensor([2.0, 1.0, 1.0, 1.0]),      # share 5/7: shortfall 2/7
    }
    limits = {name: 4 for name in spectra}
    # budget 3 * 2 = 6 split 0 : 1/2 : 2/7 -> 0, 3.82, 2.18 -> 0, 4, 2 (largest remainder); floor 1
    assert spectral_ranks(spectra, 2, limits) == {"concentrated": 1, "flat": 4, "decaying": 2}
    assert spectral_ranks(spectra, 2, {**limits, "flat": 3}) == {"concentrated": 1, "flat": 3, "decaying": 2}


def test_lamda_plus_plus_gives_per_layer_ranks_that_save_and_load(tmp_path, batch):
    from conftest import make_llama
    from rankwise.adapters import load_adapter, save_adapter

    def base():
        model = make_llama()
        with torch.no_grad():  # one weight of rank 1: its top-4 directions hold all its energy
            q = model.model.layers[0].self_attn.q_proj.weight
            q.copy_(torch.outer(q[:, 0], q[0]))
        return model

    model = adapt(base(), "lamda", rank=4, rank_allocation="spectral")
    layers = adapter_layers(model)
    ranks = {name: layer.rank for name, layer in layers.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 1  # no shortfall: share 0, raised to the floor 1
    assert sum(ranks.values()) == 4 * len(ranks) + 1 and max(ranks.values()) > 4
    for layer in layers.values():
        assert layer.lamda_S.shape == (layer.rank, layer.rank) and layer.scaling == 4.0 / layer.rank  # alpha = 4
    for layer in layers.values():
        randomise(layer, scale=0.05)
    save_adapter(model, tmp_path)
    loaded = load_adapter(base(), tmp_path)
    assert {name: layer.rank for name, layer in adapter_layers(loaded).items()} == ranks
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)
