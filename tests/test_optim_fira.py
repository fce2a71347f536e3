"""Fira against the fira package, its formula on constructed gradients, divide_params, keys."""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import pytest
import torch
from conftest import make_batch, make_llama

from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.optim import FiraAdamW, divide_params
from rankwise.optim.fira import channel_scaling

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train(model, optimizer, steps):
    for i in range(steps):
        model(**make_batch(seed=i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_matches_the_fira_package(proj_type):
    fira = pytest.importorskip("fira")
    keys = {"rank": 8, "update_proj_gap": 4, "alpha": 1.0, "proj_type": proj_type}
    ours, theirs = make_llama(), make_llama()
    ours_opt = FiraAdamW(divide_params(ours, TARGETS, **keys), lr=1e-2, weight_decay=0.01)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # fira prints and warns
        warnings.simplefilter("ignore", FutureWarning)
        theirs_opt = fira.FiraAdamW(fira.divide_params(theirs, TARGETS, **keys), lr=1e-2, weight_decay=0.01)
    train(ours, ours_opt, 9)  # refreshes at steps 0, 4, 8; the limiter acts from step 2
    train(theirs, theirs_opt, 9)
    initial = make_llama()
    moved = 0.0
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # bitwise equal on CPU here
        moved = max(moved, (a - initial.get_parameter(name)).abs().max().item())
    assert moved > 1e-2


def adam_direction(low, t, beta1=0.9, beta2=0.999, eps=1e-6):
    """First-step Adam on a constant gradient (moments m = (1-b1^t) g, v = (1-b2^t) g^2)."""
    m, v = (1 - beta1**t) * low, (1 - beta2**t) * low * low
    return m / (v.sqrt() + eps), math.sqrt(1 - beta2**t) / (1 - beta1**t)


def test_one_step_follows_the_formula_with_alpha_and_the_limiter():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 10))
    optimizer = FiraAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 100, "alpha": 0.5}], lr=0.1)
    grad = torch.randn(6, 10)
    u = torch.linalg.svd(grad, full_matrices=False).U[:, :2]  # m < n: left basis
    start = weight.detach().clone()
    weight.grad = grad.clone()
    optimizer.step()
    low = u.T @ grad
    direction, step_size = adam_direction(low, 1)
    phi = direction.norm(dim=0) / (low.norm(dim=0) + 1e-8)  # per column of the r x n matrix
    residual = (grad - u @ low) * phi
    expected = start - 0.1 * step_size * (0.5 * u @ direction + residual)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert optimizer.state[weight]["residual_norm"].item() == pytest.approx(residual.norm().item(), rel=1e-5)

    # Same gradient again but 10x larger outside the subspace: the residual's norm may grow by 1.01 only.
    second = grad + 9 * (grad - u @ low)
    weight.grad = second.clone()
    before = weight.detach().clone()
    optimizer.step()
    low2 = u.T @ second  # equals low: the added part is orthogonal to the subspace
    m = 0.9 * 0.1 * low + 0.1 * low2
    v = 0.999 * 0.001 * low * low + 0.001 * low2 * low2
    direction2 = m / (v.sqrt() + 1e-6)
    step_size2 = math.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    raw = (second - u @ low2) * (direction2.norm(dim=0) / (low2.norm(dim=0) + 1e-8))
    limited = raw * (1.01 * residual.norm() / raw.norm())
    assert raw.norm() > 5 * residual.norm()  # the limiter really had to act
    expected = before - 0.1 * step_size2 * (0.5 * u @ direction2 + limited)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert optimizer.state[weight]["residual_norm"].item() == pytest.approx(1.01 * residual.norm().item(), rel=1e-5)


def test_one_step_with_full_projection_follows_the_formula():
    """proj_type="full": both sides projected, phi is one number ||N|| / ||R||, and the residual
    G - L R_t R^T is added with its sign (a flipped residual moves the weight the other way)."""
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(6, 10))
    optimizer = FiraAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 100, "alpha": 0.5,
                            "proj_type": "full"}], lr=0.1)
    grad = torch.randn(6, 10)
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    left, right = u[:, :2], vh[:2].T
    start = weight.detach().clone()
    weight.grad = grad.clone()
    optimizer.step()
    low = left.T @ grad @ right  # 2 x 2
    direction, step_size = adam_direction(low, 1)
    phi = direction.norm() / (low.norm() + 1e-8)
    residual = (grad - left @ low @ right.T) * phi
    expected = start - 0.1 * step_size * (0.5 * left @ direction @ right.T + residual)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-6)
    flipped = start - 0.1 * step_size * (0.5 * left @ direction @ right.T - residual)
    assert (weight.detach() - flipped).abs().max() > 100 * 1e-6  # the test tells the residual's sign


def test_channel_scaling_follows_the_basis_side():
    direction = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    low = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    columns = channel_scaling(direction, low, left=True, right=False)
    torch.testing.assert_close(columns, torch.tensor([5.0, 0.5]), rtol=1e-6, atol=0)
    rows = channel_scaling(direction, low, left=False, right=True)
    torch.testing.assert_close(rows, torch.tensor([[3.0], [math.sqrt(17) / 2]]), rtol=1e-6, atol=0)
    full = channel_scaling(direction, low, left=True, right=True)
    assert full.ndim == 0 and full.item() == pytest.approx(math.sqrt(26) / math.sqrt(5))


def test_full_projection_trains():
    model = make_llama()
    optimizer = optim.build(model, "fira", lr=1e-2, rank=4, proj_type="full")
    losses = []
    for _ in range(6):
        loss = model(**make_batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_divide_params_groups_like_the_fira_package():
    model = make_llama()
    groups = divide_params(model, ["q_proj", "mlp"], rank=4, update_proj_gap=10, alpha=0.5, proj_type="left")
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    projected = [m.weight for n, m in linear if "q_proj" in n or "mlp" in n]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in projected] and len(projected) == 8
    assert {k: v for k, v in groups[1].items() if k != "params"} == {
        "rank": 4, "update_proj_gap": 10, "alpha": 0.5, "proj_type": "left"
    }
    assert len(groups[0]["params"]) + len(projected) == len(list(model.parameters()))
    fira = pytest.importorskip("fira")
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = fira.divide_params(model, ["q_proj", "mlp"], rank=4, update_proj_gap=10, alpha=0.5, proj_type="left")
    assert [[id(p) for p in g["params"]] for g in theirs] == [[id(p) for p in g["params"]] for g in groups]


def test_divide_params_without_a_match_lists_linear_modules():
    with pytest.raises(RankwiseError, match="no nn.Linear module name contains any of.*q_proj"):
        divide_params(make_llama(), ["attention.query"])


def test_scale_is_an_alias_of_alpha():
    optimizer = optim.build(make_llama(), "fira", lr=1e-3, rank=4, scale=0.5)
    assert optimizer.param_groups[0]["alpha"] == 0.5 and "scale" not in optimizer.param_groups[0]
    assert optim.build(make_llama(), "fira", lr=1e-3, rank=4).param_groups[0]["alpha"] == 1.0  # the package's default


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"rank": 4, "alpha": 0.5, "scale": 2.0}, "both alpha=0.5 and scale=2.0"),
        ({"rank": 4, "alpha": -1.0}, "option alpha must be a number > 0"),
        ({"rank": 40}, r"rank 40 exceeds min\(m, n\) = 32"),
        ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap must be an integer >= 1"),
    ],
)
def test_bad_input_raises_before_anything_changes(hparams, message):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        optim.build(model, "fira", lr=1e-3, **hparams)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
