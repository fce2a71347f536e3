"""APOLLO / APOLLO-Mini: the apollo-torch oracle (svd projection), the update formula on a
constructed gradient, the regenerated random projection, the limiter, moment switches, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import make_batch, make_llama

from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.linalg.projections import seeded_gaussian
from rankwise.optim import APOLLOAdamW, APOLLOMiniAdamW
from rankwise.optim.projectors import GaussianBasis, mix_seed
from rankwise.optim.rules import GROWTH_LIMIT, limit_norm_growth

BETAS = (0.9, 0.999)


def projected_groups(model, **projected_keys):
    projected, others = optim.split_parameters(model)
    return [{"params": others}, {"params": [p for _, p in projected], **projected_keys}]


def train(model, optimizer, steps):
    for i in range(steps):
        model(**make_batch(seed=i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize(
    ("scale_type", "proj_type", "flags"),
    [("channel", "std", {}), ("tensor", "std", {}), ("tensor", "right", {"disable_nl": True})],
)
def test_svd_variant_matches_apollo_torch(scale_type, proj_type, flags):
    apollo_torch = pytest.importorskip("apollo_torch")
    keys = {"rank": 8, "proj": "svd", "scale_type": scale_type, "scale": 2.0, "update_proj_gap": 4}
    keys["proj_type"] = proj_type
    ours, theirs = make_llama(), make_llama()
    ours_opt = APOLLOAdamW(projected_groups(ours, **keys), lr=1e-2, weight_decay=0.01, **flags)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_opt = apollo_torch.APOLLOAdamW(projected_groups(theirs, **keys), lr=1e-2, weight_decay=0.01, **flags)
    train(ours, ours_opt, 9)  # refreshes at steps 0, 4 and 8
    train(theirs, theirs_opt, 9)
    initial = make_llama()
    moved = 0.0
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
        moved = max(moved, (a - initial.get_parameter(name)).abs().max().item())
    assert moved > 1e-2  # trained weights are compared, not two initialisations


def single_weight(rows: int, cols: int, seed: int = 0) -> torch.nn.Parameter:
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(rows, cols))


def first_adam_direction(low: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    m, v = (1 - BETAS[0]) * low, (1 - BETAS[1]) * low * low
    return m / (v.sqrt() + eps)


@pytest.mark.parametrize(("rows", "cols", "scale_type"), [(6, 10, "channel"), (10, 6, "channel"), (6, 10, "tensor")])
def test_first_step_scales_the_raw_gradient(rows, cols, scale_type):
    weight = single_weight(rows, cols)
    before = weight.detach().clone()
    lr, rank, scale = 0.1, 2, 3.0
    optimizer = APOLLOAdamW(
        [{"params": [weight], "rank": rank, "scale_type": scale_type, "scale": scale, "seed": 7}], lr=lr
    )
    grad = torch.randn(rows, cols)
    weight.grad = grad.clone()
    optimizer.step()

    param_seed = 7 * 1_000_003 + 0  # group seed, position 0
    assert optimizer.state[weight]["proj_seed"] == mix_seed(param_seed, 0)
    std = 1 / math.sqrt(rank)
    if rows < cols:  # std orientation: project the shorter side (rows), channels are columns
        sketch = seeded_gaussian(rows, rank, optimizer.state[weight]["proj_seed"], std=std)
        low, dim = sketch.T @ grad, 0
    else:
        sketch = seeded_gaussian(cols, rank, mix_seed(optimizer.state[weight]["proj_seed"], 1), std=std)
        low, dim = grad @ sketch, 1
    torch.testing.assert_close(optimizer.state[weight]["exp_avg"], (1 - BETAS[0]) * low)
    direction = first_adam_direction(low)
    if scale_type == "channel":
        factor = direction.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + 1e-8)
    else:
        factor = direction.norm() / (low.norm() + 1e-8)
    step_size = lr * math.sqrt(1 - BETAS[1]) / (1 - BETAS[0])
    expected = before - step_size * math.sqrt(scale) * grad * factor
    torch.testing.assert_close(weight.detach(), expected)


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_first_step_with_full_projection_scales_the_raw_gradient_by_one_ratio(proj):
    """proj_type="full" (tensor-wise scaling): R = P_L^T G P_R on both sides, s = ||N|| / ||R||,
    update = sqrt(scale) s G -- the raw gradient, not a projection back."""
    weight = single_weight(6, 10)
    before = weight.detach().clone()
    lr, rank, scale = 0.1, 2, 3.0
    keys = {"rank": rank, "scale_type": "tensor", "scale": scale, "proj_type": "full", "proj": proj, "seed": 7}
    optimizer = APOLLOAdamW([{"params": [weight], **keys}], lr=lr)
    grad = torch.randn(6, 10)
    weight.grad = grad.clone()
    optimizer.step()
    if proj == "random":
        seed, std = optimizer.state[weight]["proj_seed"], 1 / math.sqrt(rank)
        left, right = seeded_gaussian(6, rank, seed, std=std), seeded_gaussian(10, rank, mix_seed(seed, 1), std=std)
    else:
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        left, right = u[:, :rank], vh[:rank].T
    low = left.T @ grad @ right
    torch.testing.assert_close(optimizer.state[weight]["exp_avg"], (1 - BETAS[0]) * low)
    direction = first_adam_direction(low)
    factor = direction.norm() / (low.norm() + 1e-8)
    step_size = lr * math.sqrt(1 - BETAS[1]) / (1 - BETAS[0])
    torch.testing.assert_close(weight.detach(), before - step_size * math.sqrt(scale) * factor * grad)


def test_random_projection_is_regenerated_never_stored():
    weight = single_weight(8, 12)
    optimizer = APOLLOAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 2}], lr=1e-2)
    seeds = []
    for step in range(5):
        grad = torch.randn(8, 12)
        weight.grad = grad
        optimizer.step()
        state = optimizer.state[weight]
        seeds.append(state["proj_seed"])
        if step == 0:
            # the projection used at step 0 is the one regenerated from the stored seed
            sketch = optimizer.projector_for(optimizer.param_groups[0]).basis(state, weight).left
            torch.testing.assert_close(state["exp_avg"], (1 - BETAS[0]) * sketch.T @ grad)
            assert torch.equal(sketch, seeded_gaussian(8, 3, state["proj_seed"], std=1 / math.sqrt(3)))
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3] != seeds[4]  # refreshed every 2 steps
    tensors = {k: v.shape for k, v in optimizer.state[weight].items() if isinstance(v, torch.Tensor)}
    assert tensors == {"exp_avg": (3, 12), "exp_avg_sq": (3, 12), "limiter_norm": ()}


def test_projection_does_not_depend_on_global_rng():
    results = []
    for global_seed in (1, 2):
        model = make_llama()
        optimizer = optim.build(model, "apollo", lr=1e-2, rank=4, update_proj_gap=2)
        torch.manual_seed(global_seed)
        train(model, optimizer, 3)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_limit_norm_growth_known_answers():
    state: dict = {}
    first = torch.full((2, 3), 2.0)
    assert torch.equal(limit_norm_growth(first.clone(), state, "limiter_norm"), first)
    grown = 100 * first
    assert limit_norm_growth(grown, state, "limiter_norm") is grown  # in place
    torch.testing.assert_close(grown, GROWTH_LIMIT * first)  # capped at 1.01x the previous norm, same direction
    torch.testing.assert_close(state["limiter_norm"], GROWTH_LIMIT * first.norm())
    shrunk = limit_norm_growth(0.5 * first, state, "limiter_norm")  # shrinking is never limited
    assert torch.equal(shrunk, 0.5 * first)


def apollo_mini_deltas(grads, **flags):
    weight = single_weight(6, 10)
    optimizer = APOLLOMiniAdamW([{"params": [weight], "rank": 1}], lr=1e-2, **flags)
    deltas = []
    for grad in grads(optimizer, weight):
        before = weight.detach().clone()
        weight.grad = grad
        optimizer.step()
        deltas.append(weight.detach() - before)
    return deltas


def growing_gradients(optimizer, weight):
    """A gradient, then one whose part outside the rank-1 sketch is 100x larger: the raw-gradient
    update grows ~100x while the sketched statistics R = p^T G stay the same."""
    torch.manual_seed(3)
    grad = torch.randn(6, 10)
    yield grad
    sketch = optimizer.projector_for(optimizer.param_groups[0]).basis(optimizer.state[weight], weight).left
    outside = torch.eye(6) - sketch @ sketch.T / (sketch.T @ sketch)
    yield grad + 100 * outside @ torch.randn(6, 10)


def test_norm_growth_limiter_caps_the_growth_of_the_update():
    limited = apollo_mini_deltas(growing_gradients)
    free = apollo_mini_deltas(growing_gradients, disable_nl=True)
    ratio = limited[1].norm() / limited[0].norm()
    bias = (math.sqrt(1 - BETAS[1] ** 2) / (1 - BETAS[0] ** 2)) / (math.sqrt(1 - BETAS[1]) / (1 - BETAS[0]))
    torch.testing.assert_close(ratio.item(), GROWTH_LIMIT * bias, rtol=1e-4, atol=0)  # step sizes differ by bias
    assert free[1].norm() / free[0].norm() > 20 * ratio
    torch.testing.assert_close(limited[1] / limited[1].norm(), free[1] / free[1].norm())  # direction kept


def test_mini_defaults_and_state_shapes():
    model = make_llama()
    optimizer = optim.build(model, "apollo_mini", lr=1e-3)
    group = optimizer.param_groups[0]
    assert (group["rank"], group["scale_type"], group["scale"], group["proj"]) == (1, "tensor", 128.0, "random")
    full = optim.build(make_llama(), "apollo", lr=1e-3, rank=8).param_groups[0]
    assert (full["scale_type"], full["scale"], full["update_proj_gap"], full["moment_policy"]) == (
        "channel",
        1.0,
        200,
        "keep",
    )
    train(model, optimizer, 1)
    down = model.model.layers[0].mlp.down_proj.weight  # 32 x 64: left projection, moments 1 x 64
    gate = model.model.layers[0].mlp.gate_proj.weight  # 64 x 32: right projection, moments 64 x 1
    assert optimizer.state[down]["exp_avg"].shape == (1, 64) and optimizer.state[gate]["exp_avg"].shape == (64, 1)


def test_gaussian_coordinate_change_is_exact_inside_the_old_span():
    old = GaussianBasis(seeded_gaussian(12, 4, 1, std=0.5), None)
    new = GaussianBasis(seeded_gaussian(12, 4, 2, std=0.5), None)
    grad = old.left @ torch.randn(4, 7)  # lies in span(L_old)
    c_left, c_right = old.transition(new)
    assert c_right is None
    torch.testing.assert_close(c_left @ old.project(grad), new.project(grad), rtol=1e-4, atol=1e-4)
    old_r = GaussianBasis(None, seeded_gaussian(9, 3, 3, std=0.5))
    new_r = GaussianBasis(None, seeded_gaussian(9, 3, 4, std=0.5))
    grad_r = torch.randn(5, 3) @ old_r.right.T
    _, c_right = old_r.transition(new_r)
    torch.testing.assert_close(old_r.project(grad_r) @ c_right, new_r.project(grad_r), rtol=1e-4, atol=1e-4)


def test_rotate_policy_moves_the_moments_through_the_transition():
    weight = single_weight(8, 12)
    optimizer = APOLLOAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 1, "moment_policy": "rotate"}])
    weight.grad = torch.randn(8, 12)
    optimizer.step()
    state = optimizer.state[weight]
    projector = optimizer.projector_for(optimizer.param_groups[0])
    old_basis, old_avg = projector.basis(state, weight), state["exp_avg"].clone()
    grad = torch.randn(8, 12)
    weight.grad = grad
    optimizer.step()
    new_basis = projector.basis(state, weight)
    c_left, _ = old_basis.transition(new_basis)
    expected = BETAS[0] * (c_left @ old_avg) + (1 - BETAS[0]) * new_basis.project(grad)
    torch.testing.assert_close(state["exp_avg"], expected)


def test_bf16_weights_keep_their_dtype():
    model = make_llama().to(torch.bfloat16)
    optimizer = optim.build(model, "apollo", lr=1e-2, rank=4, update_proj_gap=1)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    train(model, optimizer, 2)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16 and optimizer.state[weight]["exp_avg"].dtype == torch.bfloat16
    assert optimizer.state[weight]["limiter_norm"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters()) and not torch.equal(weight, before)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"rank": 33}, r"rank 33 exceeds min\(m, n\) = 32"),
        ({"rank": 4, "proj": "gaussian"}, "option proj must be one of 'random', 'svd', got 'gaussian'"),
        ({"rank": 4, "scale_type": "row"}, "option scale_type must be one of 'channel', 'tensor', got 'row'"),
        ({"rank": 4, "proj_type": "full"}, "scale_type='channel' needs one unprojected side"),
        ({"rank": 4, "norm_growth_limiter": "yes"}, "norm_growth_limiter must be None or True or False"),
        ({"rank": 4, "seed": 1.5}, "seed must be an integer"),
        ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap must be an integer >= 1"),
        ({"rank": 4, "alpha": 2.0}, r"unknown option\(s\) alpha; it accepts: .*scale_type"),
    ],
)
def test_bad_input_raises_before_anything_changes(hparams, message):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        optim.build(model, "apollo", lr=1e-3, **hparams)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_full_projection_with_tensor_scaling_trains():
    model = make_llama()
    optimizer = optim.build(model, "apollo", lr=1e-2, rank=4, proj_type="full", scale_type="tensor")
    batch = make_batch()
    losses = []
    for _ in range(10):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[weight]["exp_avg"].shape == (4, 4)
    assert losses[-1] < losses[0]
