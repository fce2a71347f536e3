"""LoRA-GGPO (arXiv 2502.14538 v1): the perturbation covariance, its gradient statistics and training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_batch
from rankwise.adapters import adapt, adapter_layers, after_step
from rankwise.adapters.lora_ggpo import LoraGgpoLayer
from rankwise.errors import RankwiseError


def constructed_layer(sigma: float = 0.5, beta: float = 2.0) -> LoraGgpoLayer:
    """3 x 4 layer with ``W' = W + B A`` (s = 1) whose rows have squared norms 7, 4, 9."""
    base = nn.Linear(4, 3, bias=False)
    base.weight.requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 3]]))
    layer = LoraGgpoLayer(base, 1, 1.0, sigma=sigma, beta=beta)
    layer.initialize()
    with torch.no_grad():
        layer.lora_A.copy_(torch.ones(1, 4))
        layer.lora_B.copy_(torch.tensor([[1.0], [0.0], [0.0]]))
    return layer


def test_perturbation_std_is_the_paper_covariance_on_known_weights_and_gradients():
    layer = constructed_layer(sigma=0.5, beta=2.0)
    # no gradient seen yet: sigma^2/n ||W'_i||^2 with sigma^2/n = 0.25/4
    torch.testing.assert_close(layer.perturbation_std(), torch.tensor([7.0, 4.0, 9.0]).mul(0.0625).sqrt())
    layer.gradient_row_norms_sq.copy_(torch.tensor([1.0, 0.0, 4.0]))
    # sigma^2/n (||W'_i||^2 + beta ||grad W'_i||^2) = 0.0625 * (9, 4, 17)
    torch.testing.assert_close(layer.perturbation_std(), torch.tensor([0.75, 0.5, math.sqrt(0.0625 * 17)]))


def test_training_forward_adds_x_eps_t_with_the_seeded_row_scaled_gaussian():
    layer = constructed_layer()
    layer.gradient_row_norms_sq.copy_(torch.tensor([1.0, 0.0, 4.0]))
    eye = torch.eye(4)  # x = I makes x eps^T = eps^T
    clean = layer.eval()(eye)
    torch.manual_seed(7)
    noisy = layer.train()(eye)
    torch.manual_seed(7)
    expected_eps = torch.randn(3, 4) * layer.perturbation_std()[:, None]
    torch.testing.assert_close(noisy - clean, expected_eps.T)


def test_perturbation_is_absent_in_eval_mode_and_when_merged():
    layer = constructed_layer()
    x = torch.randn(5, 4)
    lora_output = x @ (layer.base.weight + layer.delta_weight()).T
    torch.testing.assert_close(layer.eval()(x), lora_output)
    layer.merge()
    torch.testing.assert_close(layer.train()(x), lora_output)


def test_perturbation_is_deterministic_given_the_seed_and_fresh_each_forward():
    layer = constructed_layer().train()
    x = torch.randn(5, 4)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    again = layer(x)
    assert torch.equal(first, again)
    assert not torch.allclose(layer(x), first)


def test_after_step_stores_row_norms_of_the_merged_weight_gradient():
    layer = constructed_layer().train()
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 1.0, 1.0, 0.0]])
    weights = torch.tensor([1.0, -2.0, 3.0])
    # L = sum_t w . y_t is linear in W', so dL/dW' = w (sum_t x_t)^T whatever eps is drawn
    (layer(x) * weights).sum().backward()
    expected = weights.square() * x.sum(dim=0).square().sum()
    LoraGgpoLayer.after_step({"layer": layer}, step=1, total_steps=2)
    torch.testing.assert_close(layer.gradient_row_norms_sq, expected)
    # gradient accumulation: two micro-batches add their gradients before the step
    (layer(x) * weights).sum().backward()
    (layer(x) * weights).sum().backward()
    LoraGgpoLayer.after_step({"layer": layer}, step=2, total_steps=2)
    torch.testing.assert_close(layer.gradient_row_norms_sq, 4 * expected)


def test_captured_gradient_equals_the_full_weight_gradient():
    layer = constructed_layer().train()
    layer.base.weight.requires_grad_(True)  # only to read dL/dW as an oracle
    x = torch.randn(6, 4)
    torch.tanh(layer(x)).square().sum().backward()
    torch.testing.assert_close(layer._weight_gradient, layer.base.weight.grad)


def test_after_step_without_a_backward_pass_says_what_to_do():
    layer = constructed_layer()
    with pytest.raises(RankwiseError, match="call rankwise.adapters.after_step once after each optimizer.step"):
        LoraGgpoLayer.after_step({"layer": layer}, step=1, total_steps=1)


@pytest.mark.parametrize("options, message", [({"sigma": -0.1}, "option sigma must be a number >= 0"),
                                              ({"beta": "big"}, "option beta must be a number >= 0")])
def test_bad_options_raise_and_leave_the_model(llama, options, message):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        adapt(llama, "lora_ggpo", rank=4, **options)
    assert not adapter_layers(llama)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_training_with_after_step_lowers_the_loss_and_records_the_gradient_term(llama):
    model = adapt(llama, "lora_ggpo", rank=4, sigma=0.05, beta=0.01)
    batch = make_batch()
    with torch.no_grad():
        start = model(**batch).loss.item()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    steps = 8
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        after_step(model, step=step, total_steps=steps, optimizer=optimizer)
    model.eval()
    with torch.no_grad():
        end = model(**batch).loss.item()
    assert end < start - 0.05
    for layer in adapter_layers(model).values():
        assert (layer.gradient_row_norms_sq > 0).all()
        assert layer._weight_gradient is None
        merged = layer.base.weight.detach() + layer.delta_weight().detach()
        variance = merged.square().sum(dim=1) + 0.01 * layer.gradient_row_norms_sq
        torch.testing.assert_close(layer.perturbation_std(), (0.05**2 / layer.in_features * variance).sqrt())
