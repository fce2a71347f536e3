"""LDAdam (rankwise.optim.ldadam): the projection-aware moment rotation with variance
correction, the generalized error feedback (error + applied = gradient + lost momentum), the
power-iteration subspace, the state and bad input. Resume equality is in the common suite."""

from __future__ import annotations

import pytest
import torch

from rankwise.errors import RankwiseError
from rankwise.linalg.projections import Basis
from rankwise.optim.ldadam import LDAdamW, power_iteration_step, rotate_moments_with_variance_correction

BETAS = (0.908, 0.99)
GROUP = {"betas": BETAS, "correct_bias": True}


def random_orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


def test_rotation_of_a_single_coordinate_scales_mean_by_c_and_second_moment_by_c_squared():
    state = {"step": 3, "exp_avg": torch.tensor([[0.5, -2.0]]), "exp_avg_sq": torch.tensor([[0.7, 5.0]])}
    rotate_moments_with_variance_correction(state, GROUP, torch.tensor([[0.6]]), None)
    torch.testing.assert_close(state["exp_avg"], torch.tensor([[0.3, -1.2]]))
    torch.testing.assert_close(state["exp_avg_sq"], torch.tensor([[0.36 * 0.7, 0.36 * 5.0]]))


def test_rotation_by_a_permutation_permutes_both_moments_exactly():
    perm = torch.eye(3)[[2, 0, 1]]
    m, v = torch.randn(3, 4), torch.rand(3, 4) + 1.0
    state = {"step": 5, "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    rotate_moments_with_variance_correction(state, GROUP, perm, None)
    torch.testing.assert_close(state["exp_avg"], perm @ m)
    torch.testing.assert_close(state["exp_avg_sq"], perm @ v)


def test_rotation_matches_the_variance_plus_squared_mean_formula():
    k = 4
    b1, b2 = 1 - BETAS[0] ** k, 1 - BETAS[1] ** k
    c = random_orthonormal(5, 5, 1)[:3, :3]  # a contraction, as P_new^T P_old
    m, v = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.5
    state = {"step": k, "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    rotate_moments_with_variance_correction(state, GROUP, c.clone(), None)
    rotated = torch.einsum("ij,jk->ik", c, m)
    variance = v / b2 - m**2 / b1**2
    expected = (torch.einsum("ij,jk->ik", c**2, variance) + rotated**2 / b1**2).abs() * b2
    torch.testing.assert_close(state["exp_avg"], rotated)
    torch.testing.assert_close(state["exp_avg_sq"], expected)
    right = {"step": k, "exp_avg": m.T.clone(), "exp_avg_sq": v.T.clone()}  # right side: the transpose
    rotate_moments_with_variance_correction(right, GROUP, None, c.T.clone())
    torch.testing.assert_close(right["exp_avg_sq"], expected.T)


def test_power_iteration_recovers_the_column_space_of_a_low_rank_matrix():
    left, right = random_orthonormal(8, 2, 2), random_orthonormal(12, 2, 3)
    matrix = (left * torch.tensor([3.0, 1.0], dtype=torch.float64)) @ right.T
    start = Basis(random_orthonormal(8, 2, 4), None)
    new = power_iteration_step(matrix, start)
    torch.testing.assert_close(new.left @ (new.left.T @ matrix), matrix)
    torch.testing.assert_close(new.left.T @ new.left, torch.eye(2, dtype=torch.float64))
    new_right = power_iteration_step(matrix, Basis(None, random_orthonormal(12, 2, 5))).right
    torch.testing.assert_close(matrix @ new_right @ new_right.T, matrix)


def make(**keys):
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 10, generator=gen))
    optimizer = LDAdamW([{"params": [weight], "rank": 2, **keys}], lr=0.05)
    return weight, optimizer


def gradients(count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(6, 10, generator=gen) for _ in range(count)]


def test_first_step_uses_the_svd_and_the_state_has_the_documented_shapes():
    weight, optimizer = make()
    grad = gradients(1)[0]
    weight.grad = grad.clone()
    optimizer.step()
    state = optimizer.state[weight]
    u = torch.linalg.svd(grad).U[:, :2]
    torch.testing.assert_close(state["proj_left"].abs(), u.abs())  # SVD vectors up to sign
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (2, 10)
    assert state["error"].shape == (6, 10)
    torch.testing.assert_close(state["error"], grad - u @ (u.T @ grad), atol=1e-6, rtol=0)
    _, without = make(error_feedback=False)
    without.param_groups[0]["params"][0].grad = grad.clone()
    without.step()
    assert "error" not in without.state[without.param_groups[0]["params"][0]]


def test_error_plus_applied_gradient_equals_gradient_plus_lost_momentum():
    """E_new + P P^T G = G + beta1 / (1 - beta1) (P_old M_old - P M') with G = G_t + E_old."""
    weight, optimizer = make()
    beta1 = BETAS[0]
    state = optimizer.state[weight]
    for index, grad in enumerate(gradients(4)):
        old_basis = state.get("proj_left")
        old_m = state["exp_avg"].clone() if "exp_avg" in state else None
        effective = grad + state["error"] if "error" in state else grad
        weight.grad = grad.clone()
        optimizer.step()
        basis = state["proj_left"]
        low = basis.T @ effective
        carried_m = (state["exp_avg"] - (1 - beta1) * low) / beta1  # M' recovered from the update
        lost = old_basis @ old_m - basis @ carried_m if index else torch.zeros_like(grad)
        expected = effective + beta1 / (1 - beta1) * lost
        torch.testing.assert_close(state["error"] + basis @ low, expected, atol=1e-5, rtol=0)
        if index:
            torch.testing.assert_close(carried_m, (basis.T @ old_basis) @ old_m, atol=1e-5, rtol=0)


def test_subspace_follows_the_momentum_and_gradient_mix():
    weight, optimizer = make(rho=0.0)  # rho = 0: the target is the (error-fed) gradient alone
    left, right = random_orthonormal(6, 2, 7).float(), random_orthonormal(10, 2, 8).float()
    grad = left @ torch.diag(torch.tensor([2.0, 1.0])) @ right.T  # rank 2: nothing left out
    for _ in range(2):
        weight.grad = grad.clone()
        optimizer.step()
    basis = optimizer.state[weight]["proj_left"]
    torch.testing.assert_close(basis @ (basis.T @ grad), grad, atol=1e-5, rtol=0)
    assert optimizer.state[weight]["error"].abs().max() < 1e-4


def test_error_feedback_survives_a_cleared_gradient():
    weight, optimizer = make()
    weight.grad = gradients(1)[0]
    optimizer.step()
    optimizer.zero_grad()
    assert weight.grad is None and optimizer.state[weight]["error"].abs().sum() > 0


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"proj_type": "full"}, "option proj_type must be one of 'std', 'reverse_std', 'left', 'right', got 'full'"),
        ({"rho": 1.0}, "rho must be"),
        ({"proj_method": "qr"}, "option proj_method must be one of"),
        ({"error_feedback": "yes"}, "error_feedback must be"),
        ({"rank": 7}, "rank 7 exceeds"),
    ],
)
def test_bad_groups_raise(keys, message):
    weight = torch.nn.Parameter(torch.randn(6, 10))
    with pytest.raises(RankwiseError, match=message):
        LDAdamW([{"params": [weight], "rank": 2, **keys}], lr=0.05)
