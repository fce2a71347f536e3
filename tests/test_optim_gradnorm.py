"""GradNormLoRP (rankwise.optim.gradnorm_lorp): the identity W = g v / ||v|| after every step,
the weight-normalisation gradients against autograd, and one full step against an
independent implementation of the paper's update (autograd gradients, explicit SVD)."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.optim.gradnorm_lorp import GradNormLoRPAdamW, weight_norm_gradients

LR, BETAS, EPS, RANK, SCALE = 0.05, (0.9, 0.999), 1e-6, 2, 0.5


def setup(seed: int = 0, **keys):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(5, 8, generator=gen, dtype=torch.float64))
    target = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    group = {"params": [weight], "rank": RANK, "scale": SCALE, "update_proj_gap": 2, **keys}
    return weight, target, GradNormLoRPAdamW([group], lr=LR, betas=BETAS, eps=EPS)


def test_weight_norm_gradients_match_autograd():
    gen = torch.Generator().manual_seed(1)
    magnitude = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    direction = torch.randn(4, 6, generator=gen, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    weight = magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
    (weight * upstream).sum().backward()
    unit = (direction / direction.norm(dim=1, keepdim=True)).detach()
    norms = direction.norm(dim=1).detach()
    magnitude_grad, direction_grad = weight_norm_gradients(upstream, unit, magnitude.detach(), norms)
    torch.testing.assert_close(magnitude_grad, magnitude.grad)
    torch.testing.assert_close(direction_grad, direction.grad)
    torch.testing.assert_close((direction_grad * direction.detach()).sum(dim=1), torch.zeros(4, dtype=torch.float64))


def first_adam(grad: torch.Tensor) -> torch.Tensor:
    beta1, beta2 = BETAS
    return LR * math.sqrt(1 - beta2) / (1 - beta1) * ((1 - beta1) * grad / (((1 - beta2) * grad**2).sqrt() + EPS))


def test_one_step_matches_an_independent_implementation_of_the_paper():
    weight, target, optimizer = setup()
    # the reparametrisation at the first step: g = ||W_i||, v = W
    magnitude = weight.detach().norm(dim=1).requires_grad_()
    direction = weight.detach().clone().requires_grad_()
    rebuilt = magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
    loss = ((rebuilt - target) ** 2).sum()
    loss.backward()
    u = torch.linalg.svd(direction.grad, full_matrices=False).U[:, :RANK]  # 5 x 8: left projection
    new_direction = direction.detach() - SCALE * (u @ first_adam(u.T @ direction.grad))
    new_magnitude = magnitude.detach() - first_adam(magnitude.grad)
    expected = new_magnitude[:, None] * new_direction / new_direction.norm(dim=1, keepdim=True)

    ((weight - target) ** 2).sum().backward()
    optimizer.step()
    torch.testing.assert_close(weight.detach(), expected)
    state = optimizer.state[weight]
    torch.testing.assert_close(state["magnitude"], new_magnitude)
    torch.testing.assert_close(state["direction_norm"], new_direction.norm(dim=1))
    assert state["exp_avg"].shape == (RANK, 8) and state["proj_left"].shape == (5, RANK)
    assert state["magnitude_exp_avg"].shape == state["magnitude_exp_avg_sq"].shape == (5,)


@pytest.mark.parametrize("keys", [{}, {"weight_decay": 0.1}, {"moment_policy": "rotate"}])
def test_rows_of_the_weight_keep_norm_g_and_training_reduces_the_loss(keys):
    weight, target, optimizer = setup(**keys)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = ((weight - target) ** 2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        state = optimizer.state[weight]
        torch.testing.assert_close(weight.detach().norm(dim=1), state["magnitude"].abs())
    assert losses[-1] < losses[0]


def test_a_weight_changed_between_steps_is_respected():
    """g follows the row norms of W, so decaying W outside the optimizer decays g too."""
    weight, target, optimizer = setup()
    for _ in range(2):
        optimizer.zero_grad()
        ((weight - target) ** 2).sum().backward()
        optimizer.step()
        with torch.no_grad():
            weight.mul_(0.5)
    state = optimizer.state[weight]
    torch.testing.assert_close(weight.detach().norm(dim=1), 0.5 * state["magnitude"].abs())
    optimizer.zero_grad()
    ((weight - target) ** 2).sum().backward()
    optimizer.step()
    torch.testing.assert_close(weight.detach().norm(dim=1), state["magnitude"].abs())
