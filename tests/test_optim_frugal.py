"""FRUGAL (rankwise.optim.frugal): the split of each update into state-full Adam and
state-free signSGD / SGD on the rest, the subspaces, the block rotation and bad input.

Known answers on constructed inputs: at a parameter's first step Adam's update is
``lr sqrt(1 - b2) / (1 - b1) * (1 - b1) g / (sqrt(1 - b2) |g| + eps)`` entry-wise.
"""

from __future__ import annotations

import math

import pytest
import torch

from cases.optim_frugal_ldadam import BLOCK_SEED
from rankwise.errors import RankwiseError
from rankwise.optim.frugal import FRUGAL, FrugalAdamW, active_blocks, carry_coordinates, coordinate_count

LR, BETAS, EPS = 0.1, (0.9, 0.999), 1e-6


def first_adam_step(low_grad: torch.Tensor) -> torch.Tensor:
    """Adam's first update (bias-corrected step size times direction) of ``low_grad``."""
    beta1, beta2 = BETAS
    direction = (1 - beta1) * low_grad / (((1 - beta2) * low_grad**2).sqrt() + EPS)
    return LR * math.sqrt(1 - beta2) / (1 - beta1) * direction


def single(shape=(6, 10), seed=0, **keys) -> tuple[torch.nn.Parameter, torch.Tensor, FrugalAdamW]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    grad = torch.randn(*shape, generator=gen)
    optimizer = FrugalAdamW([{"params": [weight], "rank": None, **keys}], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    return weight, grad, optimizer


def chosen_entries(optimizer, weight) -> torch.Tensor:
    """Boolean mask of the entries the coordinates projector chose for ``weight``."""
    basis = optimizer.projector_for(optimizer.param_groups[0]).basis(optimizer.state[weight], weight)
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[basis.indices] = True
    return mask.view(weight.shape)


def step(weight, grad, optimizer) -> torch.Tensor:
    before = weight.detach().clone()
    weight.grad = grad.clone()
    optimizer.step()
    return before - weight.detach()  # the applied update


@pytest.mark.parametrize("state_free", ["sign", "sgd", "none"])
def test_coordinates_split_adam_on_the_chosen_entries_and_the_rule_on_the_rest(state_free):
    weight, grad, optimizer = single(proj="coordinates", density=0.3, state_free=state_free)
    applied = step(weight, grad, optimizer)
    state = optimizer.state[weight]
    chosen = chosen_entries(optimizer, weight)
    assert int(chosen.sum()) == coordinate_count(grad.shape, 0.3) == 18
    assert state["exp_avg"].shape == (18,)
    torch.testing.assert_close(applied[chosen], first_adam_step(grad[chosen]))
    rest = {"sign": LR * grad.sign(), "sgd": LR * grad, "none": torch.zeros_like(grad)}[state_free]
    torch.testing.assert_close(applied[~chosen], rest[~chosen])


def test_svd_split_adam_in_the_subspace_and_sign_of_the_residual():
    weight, grad, optimizer = single(proj="svd", density=0.5)  # 6 x 10: left projection, r = 3
    applied = step(weight, grad, optimizer)
    u = torch.linalg.svd(grad, full_matrices=False).U[:, :3]
    low = u.T @ grad
    expected = u @ first_adam_step(low) + LR * (grad - u @ low).sign()
    torch.testing.assert_close(applied, expected, rtol=1e-5, atol=1e-6)
    assert optimizer.state[weight]["proj_left"].shape == (6, 3)


def test_scale_and_state_free_lr_scale_multiply_the_two_parts():
    weight, grad, optimizer = single(proj="coordinates", density=0.3, scale=0.5, state_free_lr_scale=0.1)
    reference, _, plain = single(proj="coordinates", density=0.3)
    applied, plain_applied = step(weight, grad, optimizer), step(reference, grad, plain)
    mask = chosen_entries(plain, reference)  # same seeds: both optimizers chose the same entries
    torch.testing.assert_close(applied[mask], 0.5 * plain_applied[mask])
    torch.testing.assert_close(applied[~mask], 0.05 * plain_applied[~mask])


def test_random_subspace_is_orthonormal_regenerated_from_the_seed_and_redrawn_at_refresh():
    weight, grad, optimizer = single(shape=(12, 8), proj="random", density=0.5, update_proj_gap=2)
    projector = optimizer.projector_for(optimizer.param_groups[0])
    step(weight, grad, optimizer)
    state = optimizer.state[weight]
    first = projector.basis(state, weight)
    assert first.left is None and first.right.shape == (8, 4)  # 12 x 8: right side, r = round(0.5 * 8)
    torch.testing.assert_close(first.right.T @ first.right, torch.eye(4), atol=1e-6, rtol=0)
    assert torch.equal(projector.basis(dict(state), weight).right, first.right)  # from the seed alone
    assert set(state) == {"step", "refresh_at", "proj_seed", "exp_avg", "exp_avg_sq"}
    step(weight, grad, optimizer)
    step(weight, grad, optimizer)  # step 2: refresh, a new draw, statistics reset
    assert not torch.allclose(projector.basis(state, weight).right, first.right)
    assert state["moment_origin"] == 2


def test_moments_reset_at_each_switch_by_default():
    weight, grad, optimizer = single(proj="svd", density=0.5, update_proj_gap=2)
    for _ in range(3):
        step(weight, grad, optimizer)
    state = optimizer.state[weight]
    low = state["proj_left"].T @ grad
    torch.testing.assert_close(state["exp_avg"], (1 - BETAS[0]) * low)  # one gradient since the reset
    torch.testing.assert_close(state["exp_avg_sq"], (1 - BETAS[1]) * low**2)


def test_coordinates_rotate_carries_moments_of_entries_selected_again():
    group = single(proj="coordinates", density=0.5)[2].param_groups[0]
    state = {"exp_avg": torch.tensor([1.0, 2.0, 3.0]), "exp_avg_sq": torch.tensor([4.0, 5.0, 6.0])}
    carry_coordinates(state, group, torch.tensor([2, 5, 9]), torch.tensor([0, 5, 9]))
    assert torch.equal(state["exp_avg"], torch.tensor([0.0, 2.0, 3.0]))
    assert torch.equal(state["exp_avg_sq"], torch.tensor([0.0, 5.0, 6.0]))


def block_model(count: int = 8) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 5, generator=gen)) for _ in range(count)]


def stateful(optimizer, params) -> list[int]:
    return [i for i, p in enumerate(params) if optimizer.state[p]["exp_avg"].numel() > 0]


@pytest.mark.parametrize(
    "order, expected",
    [("ascending", [[0, 1], [2, 3], [4, 5]]), ("descending", [[6, 7], [4, 5], [2, 3]])],
)
def test_blocks_cycle_through_the_group_every_gap(order, expected):
    params = block_model()
    group = {"params": params, "rank": None, "density": 0.25, "update_proj_gap": 2, "block_order": order}
    optimizer = FRUGAL([group], lr=LR)
    seen = []
    for step_index in range(6):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        if step_index % 2 == 0:
            seen.append(stateful(optimizer, params))
    assert seen == expected


def test_blocks_state_free_weights_take_sign_steps_and_hold_no_state():
    params = block_model()
    grads = [torch.randn(4, 5, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    optimizer = FRUGAL([{"params": params, "rank": None, "density": 0.25, "seed": 3}], lr=LR, betas=BETAS, eps=EPS,
                       weight_decay=0.0)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()
    active = stateful(optimizer, params)
    assert active == sorted(active_blocks(8, 2, "random", 0, 3)) and len(active) == 2
    for i, (p, g, b) in enumerate(zip(params, grads, before)):
        expected = first_adam_step(g) if i in active else LR * g.sign()
        torch.testing.assert_close(b - p.detach(), expected)
        assert optimizer.state[p]["exp_avg"].numel() == (20 if i in active else 0)


def test_random_block_choice_is_seeded_and_changes_at_refresh():
    first = active_blocks(14, 2, "random", 0, BLOCK_SEED)
    assert first == {6, 13}  # the common suite's row relies on it: both down_proj weights
    assert active_blocks(14, 2, "random", 0, BLOCK_SEED) == first
    assert {frozenset(active_blocks(14, 2, "random", j, BLOCK_SEED)) for j in range(5)} != {frozenset(first)}


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"density": 1.5}, "density must be"),
        ({"proj": "columns"}, "option proj must be one of"),
        ({"state_free": "adam"}, "option state_free must be one of"),
        ({"proj": "coordinates", "rank": 2}, "rank applies to"),
        ({"proj": "svd", "density": 0.01}, "leaves no state-full part"),
        ({"block_order": "mirror"}, "option block_order must be one of"),
        ({"state_free_lr_scale": -1.0}, "state_free_lr_scale"),
        ({"proj": "svd", "rank": 7}, "rank 7 exceeds"),
    ],
)
def test_bad_groups_raise_before_anything_changes(keys, message):
    weight = torch.nn.Parameter(torch.randn(6, 10))
    before = weight.detach().clone()
    with pytest.raises(RankwiseError, match=message):
        FrugalAdamW([{"params": [weight], "rank": None, **keys}], lr=LR)
    assert torch.equal(weight, before)


def test_defaults_are_the_authors_code():
    """AdamW eps 1e-8 and weight decay 0.01, density 0.25, gap 200, signSGD, reset, random blocks."""
    optimizer = FrugalAdamW([{"params": [torch.nn.Parameter(torch.randn(6, 10))], "rank": None}])
    group = optimizer.param_groups[0]
    keys = ("eps", "weight_decay", "density", "update_proj_gap", "state_free", "moment_policy", "proj", "block_order")
    assert tuple(group[k] for k in keys) == (1e-8, 0.01, 0.25, 200, "sign", "reset", "blocks", "random")
