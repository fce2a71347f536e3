"""Training-time LoRA variants: LoRA+ (optimizer option), LoRA-Pro (optimizer + adapter name).

LoRA-Pro's math is checked on a constructed single Linear against independent least-squares
solutions (dense linear maps solved with ``torch.linalg.lstsq`` / ``pinv`` in float64); LoRA+
against a hand-built two-group ``torch.optim.AdamW``.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from conftest import make_batch, make_llama
from torch import nn

import rankwise
from rankwise import optim
from rankwise.adapters import ADAPTERS, adapter_layers
from rankwise.errors import RankwiseError
from rankwise.linalg.sylvester import solve_psd_sylvester
from rankwise.optim.lora_pro import LoRAProAdamW, equivalent_gradient, lora_pro_gradients

pytestmark = pytest.mark.usefixtures("one_thread")

M, N, R, ALPHA = 9, 7, 3, 6.0  # scaling s = alpha / r = 2


# ----- helpers -------------------------------------------------------------------------------


def single_linear(b_zero: bool = False, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A model holding one adapted ``M x N`` Linear (B random unless ``b_zero``) and its layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(N, M))
    rankwise.adapt(model, "lora_pro", rank=R, alpha=ALPHA, targets=["0"])
    layer = model[0]
    if not b_zero:
        with torch.no_grad():
            layer.lora_B.normal_()
    return model, layer


def gradients(layer: nn.Module, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g_A, g_B, G)`` of an MSE loss: LoRA gradients by autograd, and ``G = dL/dW`` computed
    on a leaf copy of the effective weight ``W + s B A``."""
    torch.manual_seed(seed)
    x, y = torch.randn(16, N), torch.randn(16, M)
    layer.zero_grad()
    nn.functional.mse_loss(layer(x), y).backward()
    weight = (layer.base.weight + layer.delta_weight()).detach().requires_grad_(True)
    nn.functional.mse_loss(nn.functional.linear(x, weight, layer.base.bias), y).backward()
    return layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), weight.grad


def tangent_map(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """Dense matrix of ``(g_A, g_B) -> s (B g_A + g_B A)`` (float64), columns = unit inputs."""
    a, b = a.double(), b.double()
    columns = []
    for k in range(R * N + M * R):
        z = torch.zeros(R * N + M * R, dtype=torch.float64)
        z[k] = 1.0
        g_a, g_b = z[: R * N].reshape(R, N), z[R * N :].reshape(M, R)
        columns.append((s * (b @ g_a + g_b @ a)).reshape(-1))
    return torch.stack(columns, dim=1)


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def train(model, optimizer, steps: int, first: int = 0) -> list[float]:
    losses = []
    for i in range(steps):
        loss = model(**make_batch(seed=first + i)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def adapted_llama(method: str = "lora_pro", seed: int = 0) -> nn.Module:
    model = make_llama(seed=seed)
    rankwise.adapt(model, method, rank=4)
    return model


# ----- the Sylvester solver ------------------------------------------------------------------


def sylvester_operator(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Matrix of X -> P X + X Q on row-major vec(X): P kron I + I kron Q^T."""
    eye_p, eye_q = (torch.eye(t.shape[0], dtype=t.dtype) for t in (p, q))
    return torch.kron(p, eye_q) + torch.kron(eye_p, q.T.contiguous())


def test_psd_sylvester_matches_the_kronecker_solution():
    torch.manual_seed(0)
    p = torch.randn(4, 6, dtype=torch.float64)
    q = torch.randn(3, 5, dtype=torch.float64)
    p, q = p @ p.T, q @ q.T
    c = torch.randn(4, 3, dtype=torch.float64)
    x = solve_psd_sylvester(p, q, c)
    expected = torch.linalg.solve(sylvester_operator(p, q), c.reshape(-1)).reshape(4, 3)
    torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-10)


def test_psd_sylvester_gives_the_minimum_norm_solution_when_singular():
    torch.manual_seed(1)
    u = torch.randn(4, 2, dtype=torch.float64)
    v = torch.randn(3, 1, dtype=torch.float64)
    p, q = u @ u.T, v @ v.T  # rank 2 and rank 1: P X + X Q is singular
    c = torch.randn(4, 3, dtype=torch.float64)
    expected = (torch.linalg.pinv(sylvester_operator(p, q)) @ c.reshape(-1)).reshape(4, 3)
    torch.testing.assert_close(solve_psd_sylvester(p, q, c), expected, rtol=1e-8, atol=1e-8)


# ----- LoRA-Pro's gradient adjustment ----------------------------------------------------------


def test_lora_gradients_are_the_chain_rule_of_the_full_gradient():
    _, layer = single_linear()
    g_a, g_b, full = gradients(layer)
    s = layer.scaling
    torch.testing.assert_close(g_a, s * layer.lora_B.detach().T @ full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_b, s * full @ layer.lora_A.detach().T, rtol=1e-5, atol=1e-6)


def test_equivalent_gradient_is_the_least_squares_approximation_of_the_full_gradient():
    """Theorem 2.1: s (B g_A' + g_B' A) = argmin || s (B g_A + g_B A) - G ||, computed from the LoRA
    gradients only; the independent answer solves the dense least-squares problem with G."""
    _, layer = single_linear()
    g_a, g_b, full = gradients(layer)
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    adjusted = lora_pro_gradients(a, b, g_a, g_b, s)
    ours = equivalent_gradient(a, b, *adjusted, s).double()

    operator = tangent_map(a, b, s)
    solution = torch.linalg.lstsq(operator, full.double().reshape(-1, 1), driver="gelsd").solution
    best = (operator @ solution).reshape(M, N)
    torch.testing.assert_close(ours, best, rtol=1e-4, atol=1e-6)
    plain = equivalent_gradient(a, b, g_a, g_b, s).double()  # what LoRA's own gradients do
    assert torch.linalg.norm(ours - full) < 0.9 * torch.linalg.norm(plain - full)


def test_sylvester_x_keeps_the_adjusted_gradients_closest_to_lora_gradients():
    """Theorem 2.2: among all minimisers, (g_A', g_B') is the one nearest (g_A, g_B): the projection
    of the LoRA gradients onto the affine solution set, z + M^+ (G* - M z)."""
    _, layer = single_linear()
    g_a, g_b, full = gradients(layer)
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    adjusted_a, adjusted_b = lora_pro_gradients(a, b, g_a, g_b, s)

    operator = tangent_map(a, b, s)
    lora = torch.cat([g_a.reshape(-1), g_b.reshape(-1)]).double()
    pinv = torch.linalg.pinv(operator)
    best = operator @ (pinv @ full.double().reshape(-1))
    nearest = lora + pinv @ (best - operator @ lora)
    torch.testing.assert_close(adjusted_a.double(), nearest[: R * N].reshape(R, N), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adjusted_b.double(), nearest[R * N :].reshape(M, R), rtol=1e-4, atol=1e-6)


def test_at_init_the_equivalent_gradient_projects_onto_the_row_space_of_a():
    """B = 0: only B moves, and the best reachable update is G A^T (A A^T)^-1 A."""
    _, layer = single_linear(b_zero=True)
    g_a, g_b, full = gradients(layer)
    a, b, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    adjusted_a, adjusted_b = lora_pro_gradients(a, b, g_a, g_b, s)
    assert torch.count_nonzero(adjusted_a) == 0
    expected = full @ torch.linalg.pinv(a) @ a
    torch.testing.assert_close(equivalent_gradient(a, b, adjusted_a, adjusted_b, s), expected, rtol=1e-4, atol=1e-6)


def test_a_step_realises_the_projected_adamw_step_of_the_equivalent_gradient():
    """First step, to first order: s (B dA + dB A) = -step * Proj(D), D = Adam's direction on g~ and
    Proj the projection onto B A's tangent space, computed here with explicit pseudo-inverses."""
    model, layer = single_linear()
    g_a, g_b, _ = gradients(layer)
    a0, b0, s = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling
    lr, eps, (beta1, beta2) = 1e-3, 1e-8, (0.9, 0.999)
    optimizer = optim.build(model, "lora_pro", lr=lr, eps=eps, betas=(beta1, beta2))
    optimizer.step()

    equivalent = equivalent_gradient(a0, b0, *lora_pro_gradients(a0, b0, g_a, g_b, s), s)
    m, v = (1 - beta1) * equivalent, (1 - beta2) * equivalent**2
    direction = m / (v.sqrt() + eps)
    step = lr * math.sqrt(1 - beta2) / (1 - beta1)
    a64, b64, d64 = a0.double(), b0.double(), direction.double()
    left = b64 @ torch.linalg.pinv(b64)
    right = torch.linalg.pinv(a64) @ a64
    projected = left @ d64 + (torch.eye(M, dtype=torch.float64) - left) @ d64 @ right
    moved_a, moved_b = layer.lora_A.detach() - a0, layer.lora_B.detach() - b0
    first_order = s * (b0 @ moved_a + moved_b @ a0)
    torch.testing.assert_close(first_order.double(), -step * projected, rtol=1e-3, atol=1e-7)
    state = optimizer.state[layer.lora_A]
    assert state["step"] == 1 and state["exp_avg"].shape == (M, N)
    torch.testing.assert_close(state["exp_avg"], m)


def test_weight_decay_shrinks_the_adapter_update_not_the_base():
    model, layer = single_linear()
    base_before = layer.base.weight.detach().clone()
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    optimizer = optim.build(model, "lora_pro", lr=0.1, weight_decay=0.5)
    layer.lora_A.grad, layer.lora_B.grad = torch.zeros_like(a0), torch.zeros_like(b0)  # decay only
    optimizer.step()
    assert torch.equal(layer.base.weight, base_before)
    torch.testing.assert_close(layer.delta_weight(), (1 - 0.1 * 0.5) * layer.scaling * b0 @ a0)


# ----- LoRA-Pro as an optimizer on the tiny LLaMA ---------------------------------------------


def test_lora_pro_lowers_the_loss_on_the_tiny_llama():
    model = adapted_llama()
    optimizer = optim.build(model, "lora_pro", lr=1e-2)
    batch = make_batch()
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses


def test_lora_pro_state_bytes_are_two_weight_sized_moments_per_layer():
    model = adapted_llama()
    optimizer = optim.build(model, "lora_pro", lr=1e-2)
    train(model, optimizer, 1)
    layers = adapter_layers(model).values()
    expected = sum(2 * layer.out_features * layer.in_features * 4 for layer in layers)
    assert optim.state_bytes(optimizer) == expected


def test_lora_pro_state_dict_loads_with_weights_only_and_resumes_exactly():
    k = 2
    straight = adapted_llama()
    train(straight, optim.build(straight, "lora_pro", lr=1e-2), 2 * k)

    first = adapted_llama()
    first_opt = optim.build(first, "lora_pro", lr=1e-2)
    train(first, first_opt, k)
    model_state, optim_state = roundtrip(first.state_dict()), roundtrip(first_opt.state_dict())
    assert optim_state["state"] and all(isinstance(v["step"], int) for v in optim_state["state"].values())

    resumed = adapted_llama(seed=123)  # everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    resumed_opt = optim.build(resumed, "lora_pro", lr=1e-2)
    resumed_opt.load_state_dict(optim_state)
    train(resumed, resumed_opt, k, first=k)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_nonfinite_lora_gradient_skips_that_layer():
    model = adapted_llama()
    optimizer = optim.build(model, "lora_pro", lr=1e-2)
    train(model, optimizer, 1)
    model(**make_batch(seed=5)).loss.backward()
    layers = list(adapter_layers(model).values())
    poisoned, other = layers[0], layers[-1]
    poisoned.lora_B.grad[0, 0] = float("nan")
    before = (poisoned.lora_A.detach().clone(), poisoned.lora_B.detach().clone())
    state_before = optimizer.state[poisoned.lora_A]["exp_avg"].clone()
    other_before = other.lora_B.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step()
    assert torch.equal(poisoned.lora_A, before[0]) and torch.equal(poisoned.lora_B, before[1])
    assert torch.equal(optimizer.state[poisoned.lora_A]["exp_avg"], state_before)
    assert optimizer.state[poisoned.lora_A]["step"] == 1
    assert not torch.equal(other.lora_B, other_before)


def test_other_trainable_parameters_get_plain_adamw():
    model = adapted_llama()
    norm = model.model.norm.weight
    norm.requires_grad_(True)
    optimizer = optim.build(model, "lora_pro", lr=1e-2)
    plain = [g for g in optimizer.param_groups if "scaling" not in g]
    assert len(plain) == 1 and plain[0]["params"] == [norm]
    pairs = [g for g in optimizer.param_groups if "scaling" in g]
    assert len(pairs) == len(adapter_layers(model)) and all(g["scaling"] == 1.0 for g in pairs)
    before = norm.detach().clone()
    train(model, optimizer, 1)
    assert not torch.equal(norm, before) and optimizer.state[norm]["exp_avg"].shape == norm.shape


def test_lora_pro_trains_any_lora_adapter_and_the_method_names_its_optimizer():
    assert ADAPTERS.get("lora_pro").training_optimizer == "lora_pro"
    assert "lora_pro" in rankwise.methods() and "lora_pro" in optim.names()
    model = adapted_llama("lora")
    assert isinstance(optim.build(model, "lora_pro", lr=1e-3), LoRAProAdamW)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "has none; call rankwise.adapt"),  # a model without adapters
        ({"bogus": 1}, "accept.*: .*eps"),
        ({"damping": 0.0}, "damping must be a number > 0"),
        ({"targets": ["q_proj"]}, "drop targets"),
        ({"layerwise": True}, "cannot run layerwise"),
    ],
)
def test_lora_pro_refuses_bad_input(kwargs, message):
    model = make_llama() if not kwargs else adapted_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        optim.build(model, "lora_pro", lr=1e-3, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----- LoRA+ ---------------------------------------------------------------------------------


def test_loraplus_puts_b_factors_in_their_own_group_at_ratio_times_lr():
    model = adapted_llama("lora")
    optimizer = optim.build(model, "adamw", lr=1e-3, loraplus_lr_ratio=16)
    slow, fast = optimizer.param_groups
    assert slow["lr"] == 1e-3 and fast["lr"] == 16 * 1e-3
    layers = adapter_layers(model).values()
    assert {id(p) for p in fast["params"]} == {id(layer.lora_B) for layer in layers}
    assert {id(p) for p in slow["params"]} == {id(layer.lora_A) for layer in layers}


def test_loraplus_trajectory_equals_a_hand_built_two_group_adamw():
    ours = adapted_llama("lora")
    ours_opt = optim.build(ours, "adamw", lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.1)
    reference = adapted_llama("lora")
    layers = list(adapter_layers(reference).values())
    reference_opt = torch.optim.AdamW(
        [
            {"params": [layer.lora_A for layer in layers], "lr": 1e-3},
            {"params": [layer.lora_B for layer in layers], "lr": 4e-3},
        ],
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.1,
    )
    train(ours, ours_opt, 3)
    train(reference, reference_opt, 3)
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) for layer in layers)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("galore", {"loraplus_lr_ratio": 16}, "offered for adamw, not 'galore'"),
        ("lora_pro", {"loraplus_lr_ratio": 16}, "offered for adamw, not 'lora_pro'"),
        ("adamw", {"loraplus_lr_ratio": 0}, "must be a number > 0"),
        ("adamw", {"loraplus_lr_ratio": True}, "must be a number > 0"),
        ("adamw", {"loraplus_lr_ratio": 16, "targets": ["q_proj"]}, "drop targets"),
    ],
)
def test_loraplus_refuses_bad_input(name, kwargs, message):
    with pytest.raises(RankwiseError, match=message):
        optim.build(adapted_llama("lora"), name, lr=1e-3, **kwargs)


def test_loraplus_needs_adapters_with_output_factors():
    with pytest.raises(RankwiseError, match="output factors"):
        optim.build(make_llama(), "adamw", lr=1e-3, loraplus_lr_ratio=16)


def test_without_loraplus_nothing_changes_for_full_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = optim.build(make_llama(), "adamw", lr=1e-3)
    assert all(group["lr"] == 1e-3 for group in optimizer.param_groups)
