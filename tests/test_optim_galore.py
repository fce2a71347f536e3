"""GaLore: paper defaults and state, the projection, bad input, moment policies, SVD failures.
The comparison with the galore-torch oracle is in test_optim_galore_oracle.py."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_llama

from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.linalg import SVDFailure
from rankwise.linalg import projections
from rankwise.linalg.projections import Basis, change_coordinates
from rankwise.optim import GaLoreAdamW

def galore_groups(model, **projected_keys):
    projected, others = optim.split_parameters(model)
    return [{"params": others}, {"params": [p for _, p in projected], **projected_keys}]


def train(model, optimizer, steps):
    for i in range(steps):
        model(**make_batch(seed=i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_build_uses_paper_defaults_and_state_shapes():
    model = make_llama(hidden=32)
    optimizer = optim.build(model, "galore", lr=1e-3, rank=8)
    group = optimizer.param_groups[0]
    method_keys = (group["update_proj_gap"], group["scale"], group["proj_type"], group["moment_policy"])
    assert method_keys == (200, 0.25, "std", "keep")
    assert group["eps"] == 1e-6 and group["weight_decay"] == 0.0
    train(model, optimizer, 1)
    down = model.model.layers[0].mlp.down_proj.weight  # 32 x 64: m < n -> left basis
    gate = model.model.layers[0].mlp.gate_proj.weight  # 64 x 32: m >= n -> right basis
    assert optimizer.state[down]["proj_left"].shape == (32, 8) and optimizer.state[down]["exp_avg"].shape == (8, 64)
    assert optimizer.state[gate]["proj_right"].shape == (32, 8) and optimizer.state[gate]["exp_avg"].shape == (64, 8)
    assert optimizer.refresh_seconds > 0


def test_projection_is_the_top_singular_subspace():
    torch.manual_seed(0)
    grad = torch.randn(6, 10)
    u, s, vh = torch.linalg.svd(grad, full_matrices=False)
    basis = projections.singular_basis(grad, 3, use_left=True, use_right=False)
    back = basis.project_back(basis.project(grad))
    torch.testing.assert_close(back, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])  # best rank-3 approximation


def test_coordinate_change_is_exact_inside_both_subspaces():
    torch.manual_seed(0)
    old_left = torch.linalg.qr(torch.randn(12, 4)).Q
    mix = torch.linalg.qr(torch.randn(4, 4)).Q  # the same subspace, other coordinates
    new_left = old_left @ mix
    grad = old_left @ torch.randn(4, 7)
    old, new = Basis(old_left, None), Basis(new_left, None)
    c_left, c_right = old.transition(new)
    torch.testing.assert_close(change_coordinates(old.project(grad), c_left, c_right), new.project(grad))
    perm = torch.eye(4)[[2, 0, 3, 1]] * torch.tensor([1.0, -1.0, 1.0, -1.0])  # signed permutation
    variance = torch.rand(4, 7)
    c_perm, _ = old.transition(Basis(old_left @ perm.T, None))
    torch.testing.assert_close(change_coordinates(variance, c_perm, None, squared=True), perm.abs() @ variance)


def test_reset_policy_restarts_the_moments_at_a_switch():
    model = make_llama()
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4, update_proj_gap=2, moment_policy="reset")
    train(model, optimizer, 2)
    weight = model.model.layers[0].self_attn.q_proj.weight
    model(**make_batch(seed=7)).loss.backward()
    grad = weight.grad.clone()
    optimizer.step()  # third step: refresh, moments reset, bias correction restarts
    state = optimizer.state[weight]
    low = Basis(state.get("proj_left"), state.get("proj_right")).project(grad)
    torch.testing.assert_close(state["exp_avg"], 0.1 * low)
    torch.testing.assert_close(state["exp_avg_sq"], 0.001 * low * low)
    assert state["moment_origin"] == 2


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"rank": 33}, r"rank 33 exceeds min\(m, n\) = 32 of model\.layers\.0\.self_attn\.q_proj\.weight"),
        ({"rank": 0}, "rank must be an integer"),
        ({"rank": 4, "update_proj_gap": 0}, "update_proj_gap must be an integer >= 1"),
        ({"rank": 4, "update_proj_gap": 2.5}, "update_proj_gap must be an integer >= 1"),
        ({"rank": 4, "proj_type": "diagonal"}, "option proj_type must be one of 'std', 'reverse_std'"),
        ({"rank": 4, "moment_policy": "spin"}, "option moment_policy must be one of 'keep', 'reset', 'rotate'"),
        ({"rank": 4, "scale": -1.0}, "scale must be a number > 0"),
        ({"rank": 4, "betas": (0.9, 1.5)}, "betas must be a sequence of 2 numbers"),
        ({"rank": 4, "alpha": 2.0}, r"unknown option\(s\) alpha; it accepts: .*rank"),
    ],
)
def test_bad_input_raises_before_anything_changes(hparams, message):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        optim.build(model, "galore", lr=1e-3, **hparams)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_projected_group_must_hold_2d_weights():
    model = make_llama()
    norm = model.model.layers[0].input_layernorm.weight
    with pytest.raises(RankwiseError, match="1 dims; only 2-D weights can be projected"):
        GaLoreAdamW([{"params": [norm], "rank": 4}])
    optimizer = GaLoreAdamW([{"params": [model.lm_head.weight], "rank": 4}])
    with pytest.raises(RankwiseError, match="1 dims"):
        optimizer.add_param_group({"params": [norm], "rank": 4})
    assert len(optimizer.param_groups) == 1


def failing_svd_after(calls_allowed: int):
    real = projections.svd
    calls = {"n": 0}

    def svd(matrix):
        calls["n"] += 1
        if calls["n"] > calls_allowed:
            raise SVDFailure("simulated non-convergence")
        return real(matrix)

    return svd


def test_failed_svd_keeps_the_previous_subspace(monkeypatch):
    model = make_llama()
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4, update_proj_gap=2)
    train(model, optimizer, 2)
    weight = model.model.layers[0].self_attn.q_proj.weight
    basis_before = optimizer.state[weight]["proj_right"].clone()
    weight_before = weight.detach().clone()
    monkeypatch.setattr(projections, "svd", failing_svd_after(0))
    model(**make_batch(seed=5)).loss.backward()
    with pytest.warns(RuntimeWarning, match="subspace refresh failed"):
        optimizer.step()
    assert torch.equal(optimizer.state[weight]["proj_right"], basis_before)
    assert not torch.equal(weight, weight_before)  # stepped in the old subspace
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.state[weight]["refresh_at"] == 2 + 2  # retried at the next scheduled refresh


def test_failed_first_svd_skips_the_step(monkeypatch):
    model = make_llama()
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4)
    weight = model.model.layers[0].self_attn.q_proj.weight
    before = weight.detach().clone()
    monkeypatch.setattr(projections, "svd", failing_svd_after(0))
    model(**make_batch()).loss.backward()
    with pytest.warns(RuntimeWarning, match="subspace refresh failed"):
        optimizer.step()
    assert torch.equal(weight, before) and "exp_avg" not in optimizer.state[weight]
    monkeypatch.undo()
    optimizer.step()  # SVD works again: the refresh is retried
    assert "proj_right" in optimizer.state[weight] and not torch.equal(weight, before)


def test_groups_without_rank_take_defaults_like_galore_torch():
    model = make_llama()
    optimizer = GaLoreAdamW([{"params": [model.lm_head.weight], "rank": 4}], lr=1e-3, no_deprecation_warning=True)
    assert optimizer.param_groups[0]["update_proj_gap"] == 200 and optimizer.param_groups[0]["proj_type"] == "std"


def test_bf16_weights_keep_their_dtype_and_stay_finite():
    model = make_llama().to(torch.bfloat16)
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4, update_proj_gap=1)
    before = model.lm_head.weight.detach().clone()
    train(model, optimizer, 2)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16 and optimizer.state[weight]["proj_right"].dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.lm_head.weight, before)


def test_seeded_gaussian_depends_on_the_seed_only():
    torch.manual_seed(1)
    first = projections.seeded_gaussian(64, 8, seed=5, std=0.5)
    torch.manual_seed(2)
    assert torch.equal(first, projections.seeded_gaussian(64, 8, seed=5, std=0.5))
    assert not torch.equal(first, projections.seeded_gaussian(64, 8, seed=6, std=0.5))
    assert abs(first.std().item() - 0.5) < 0.1
