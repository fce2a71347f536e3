"""Sparse fine-tuning adapters: S2FT and SaRA on constructed inputs.

S2FT: the update lives on whole selected channel groups only, the forward is the written-out
formula, the gradient of the trained block IS the full fine-tuning gradient of those channels
(a full-fine-tuning copy of the layer as the oracle), the selection is reproducible per seed and
layer, bad group sizes are refused, and the PEFT export is an exact rank-k LoRA.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_llama
from conftest import randomise_trainable as randomise
from rankwise.adapters import adapt, adapter_layers, export_peft, load_adapter, save_adapter
from rankwise.errors import RankwiseError

ATOL = 1e-5


def linear_model(n_in: int = 16, n_out: int = 12, bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_out, bias=bias))


# ----- S2FT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["in", "out"])
def test_s2ft_updates_only_whole_selected_groups_and_is_the_formula(axis):
    model = linear_model()
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    adapt(model, "s2ft", rank=8, targets=["0"], axis=axis, group_size=4)
    layer = adapter_layers(model)["0"]
    indices = layer.s2_indices
    groups = indices.reshape(-1, 4)  # two whole groups of 4 aligned channels
    assert torch.equal(groups - groups[:, :1], torch.arange(4).expand(2, 4)) and (groups[:, 0] % 4 == 0).all()
    assert torch.equal(indices, indices.sort().values)
    randomise(layer)
    delta = layer.delta_weight().detach()
    untouched = torch.ones(12, 16, dtype=torch.bool)
    (untouched.index_fill_(1, indices, False) if axis == "in" else untouched.index_fill_(0, indices, False))
    assert torch.count_nonzero(delta[untouched]) == 0
    x = torch.randn(5, 16)
    if axis == "in":
        expected = x @ weight.T + bias + x[:, indices] @ layer.s2_delta.T
    else:
        expected = x @ weight.T + bias
        expected[:, indices] += x @ layer.s2_delta.T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_s2ft_gradient_is_the_full_fine_tuning_gradient_of_the_selected_channels(axis):
    model = linear_model()
    full = linear_model()  # the same weights, every entry trainable: the oracle
    adapt(model, "s2ft", rank=6, targets=["0"], axis=axis, group_size=2)
    layer = adapter_layers(model)["0"]
    x, target = torch.randn(9, 16), torch.randn(9, 12)
    (model(x) - target).square().sum().backward()
    (full(x) - target).square().sum().backward()
    grad = full[0].weight.grad
    expected = grad[:, layer.s2_indices] if axis == "in" else grad[layer.s2_indices]
    torch.testing.assert_close(layer.s2_delta.grad, expected, atol=1e-5, rtol=1e-5)


def test_s2ft_selection_is_reproducible_per_seed_and_distinct_per_layer(tmp_path, batch):
    def selections(**options):
        model = adapt(make_llama(), "s2ft", rank=8, targets=["o_proj", "down_proj"], **options)
        return model, {name: layer.s2_indices.clone() for name, layer in adapter_layers(model).items()}

    model, first = selections(seed=3)
    _, again = selections(seed=3)
    _, other = selections(seed=4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    assert len({tuple(v.tolist()) for v in first.values()}) > 1  # layers draw their own channels
    for layer in adapter_layers(model).values():
        randomise(layer, scale=0.05)
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_llama(), tmp_path)
    assert all(torch.equal(adapter_layers(loaded)[n].s2_indices, first[n]) for n in first)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 6, "group_size": 4}, "rank=6 must be a multiple of group_size=4"),
        ({"rank": 4, "group_size": 3}, "group_size=3 does not divide the layer's 16 input channels"),
        ({"rank": 14, "axis": "out"}, "at most the 12 output channels"),
    ],
)
def test_s2ft_bad_groups_are_refused_and_the_model_is_left(options, message):
    model = linear_model()
    with pytest.raises(RankwiseError, match=message):
        adapt(model, "s2ft", targets=["0"], **options)
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_s2ft_exports_exactly_as_a_rank_k_lora(axis, tmp_path):
    peft = pytest.importorskip("peft")
    model = linear_model(bias=False)
    adapt(model, "s2ft", rank=4, targets=["0"], axis=axis)
    randomise(adapter_layers(model)["0"])
    report = export_peft(model, tmp_path)
    assert report["exact"] and report["modules"]["0"]["rank"] == 4 and report["modules"]["0"]["source"] != "svd"
    loaded = peft.PeftModel.from_pretrained(linear_model(bias=False), tmp_path)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=ATOL, rtol=0)


# ----- SaRA ------------------------------------------------------------------------------------


def constructed_model() -> tuple[nn.Sequential, torch.Tensor]:
    """A 12 x 16 weight with distinct magnitudes 1..192 (times 1e-3, signs alternating)."""
    model = linear_model()
    magnitudes = torch.randperm(192, generator=torch.Generator().manual_seed(5)).float() + 1
    signs = torch.where(torch.arange(192) % 2 == 0, 1.0, -1.0)
    with torch.no_grad():
        model[0].weight.copy_((1e-3 * magnitudes * signs).reshape(12, 16))
    return model, model[0].weight.detach().clone()


def test_sara_trains_exactly_the_smallest_entries_and_the_update_lives_there():
    model, weight = constructed_model()
    adapt(model, "sara", rank=2, targets=["0"])  # budget r (in + out) = 56 entries
    layer = adapter_layers(model)["0"]
    expected = torch.nonzero(weight.abs().flatten() <= 56e-3).flatten()  # magnitudes 1..56 (x 1e-3)
    assert torch.equal(layer.sara_indices, expected) and layer.sara_values.numel() == 56
    randomise(layer)
    delta = layer.delta_weight().detach().flatten()
    assert torch.count_nonzero(delta[weight.abs().flatten() > 56e-3]) == 0
    torch.testing.assert_close(delta[expected], layer.sara_values.detach(), atol=0, rtol=0)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (weight + delta.view(12, 16)).T + model[0].base.bias,
                                   atol=ATOL, rtol=0)


def test_sara_threshold_selects_the_entries_below_it():
    model, weight = constructed_model()
    adapt(model, "sara", rank=1, targets=["0"], threshold=20.5e-3)
    layer = adapter_layers(model)["0"]
    assert torch.equal(layer.sara_indices, torch.nonzero(weight.abs().flatten() < 20.5e-3).flatten())
    assert layer.sara_values.numel() == 20
    with pytest.raises(RankwiseError, match="no entry of the weight has \\|w\\| < threshold=1e-06"):
        adapt(linear_model(), "sara", rank=1, targets=["0"], threshold=1e-6)


def test_sara_gradient_is_the_full_fine_tuning_gradient_of_the_selected_entries():
    model, full = linear_model(), linear_model()
    adapt(model, "sara", rank=2, targets=["0"], lambda_rank=0.0)
    layer = adapter_layers(model)["0"]
    x, target = torch.randn(9, 16), torch.randn(9, 12)
    (model(x) - target).square().sum().backward()
    (full(x) - target).square().sum().backward()
    torch.testing.assert_close(layer.sara_values.grad, full[0].weight.grad.flatten()[layer.sara_indices],
                               atol=1e-5, rtol=1e-5)


def test_sara_regulariser_is_lambda_times_the_nuclear_norm_of_the_update():
    from rankwise.adapters import regularization_loss

    model = linear_model()
    adapt(model, "sara", rank=2, targets=["0"], lambda_rank=0.01)
    layer = adapter_layers(model)["0"]
    regularization_loss(model).backward()  # at dW = 0: a finite subgradient
    assert torch.isfinite(layer.sara_values.grad).all()
    randomise(layer)
    nuclear = torch.linalg.matrix_norm(layer.delta_weight().detach().double(), ord="nuc")
    torch.testing.assert_close(regularization_loss(model).double(), 0.01 * nuclear, atol=1e-6, rtol=1e-6)
    model_off = linear_model()
    adapt(model_off, "sara", rank=2, targets=["0"], lambda_rank=0.0)
    assert regularization_loss(model_off) is None


def test_sara_progressive_stage_reselects_on_the_current_weight_and_freezes_the_grown_entries(tmp_path):
    from rankwise.adapters import after_step

    model, weight = constructed_model()
    adapt(model, "sara", rank=2, targets=["0"], lambda_rank=0.0, progressive_fraction=0.5)
    layer = adapter_layers(model)["0"]
    first = layer.sara_indices.clone()
    optimizer = torch.optim.Adam([layer.sara_values], lr=3e-2)
    x, target = torch.randn(16, 16), torch.randn(16, 12)
    total = 10
    for step in range(1, total + 1):
        optimizer.zero_grad(set_to_none=True)
        (model(x) - target).square().mean().backward()
        optimizer.step()
        before = layer.delta_weight().detach().clone()
        after_step(model, step=step, total_steps=total, optimizer=optimizer)
        if step < 5:
            assert int(layer.stage) == 0 and torch.equal(layer.sara_indices, first)
        if step == 5:  # the switch: dW is unchanged, the new entries are the smallest of W0 + dW
            assert int(layer.stage) == 1 and layer.sara_values not in optimizer.state
            torch.testing.assert_close(layer.delta_weight().detach(), before, atol=0, rtol=0)
            current = (weight + before).abs().flatten()
            assert torch.equal(layer.sara_indices, torch.topk(current, 56, largest=False).indices.sort().values)
            assert not torch.equal(layer.sara_indices, first)
            grown = first[~torch.isin(first, layer.sara_indices)]
            frozen_update = before.flatten()[grown].clone()
            assert torch.count_nonzero(frozen_update) == grown.numel() > 0
    # entries that grew out of the selection kept their learned values through 5 more Adam steps
    torch.testing.assert_close(layer.delta_weight().detach().flatten()[grown], frozen_update, atol=0, rtol=0)
    save_adapter(model, tmp_path)
    loaded = adapter_layers(load_adapter(constructed_model()[0], tmp_path))["0"]
    assert int(loaded.stage) == 1 and torch.equal(loaded.delta_weight(), layer.delta_weight().detach())


@pytest.mark.parametrize("kind", ["conv2d", "embedding"])
def test_sara_on_a_convolution_and_an_embedding_merges_to_the_same_output(kind):
    from rankwise.adapters import merge

    torch.manual_seed(0)
    module = nn.Conv2d(3, 5, 3, padding=1) if kind == "conv2d" else nn.Embedding(20, 6)
    model = nn.Sequential(module)
    x = torch.randn(2, 3, 6, 6) if kind == "conv2d" else torch.randint(0, 20, (2, 7))
    adapt(model, "sara", rank=1, targets=["0"])
    randomise(adapter_layers(model)["0"])
    with torch.no_grad():
        unmerged = model(x)
        merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=ATOL, rtol=0)
