"""The DCT optimizer: the basis, known-answer column selection, the shared matrix counted once,
exact moment rotation, refresh cost against SVD, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batch, make_llama

from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.linalg.dct import dct_columns, dct_matrix, dct_rows
from rankwise.optim import DCTAdamW
from rankwise.optim.dct import SelectedColumnsBasis, alignment_scores

BETA1 = 0.9


@pytest.mark.parametrize("size", [1, 2, 7, 32, 33])
def test_dct_matrix_is_orthonormal_and_matches_the_fft(size):
    q = dct_matrix(size, dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q[:, 0], torch.full((size,), 1 / math.sqrt(size), dtype=torch.float64))
    rows = torch.randn(5, size, dtype=torch.float64)
    torch.testing.assert_close(dct_rows(rows), rows @ q, rtol=0, atol=1e-12)
    some = torch.tensor([size - 1, 0, size // 2])
    assert torch.equal(dct_columns(size, some, dtype=torch.float64), q[:, some])


def test_dct_of_a_cosine_is_one_coefficient():
    size, frequency = 16, 5
    i = torch.arange(size, dtype=torch.float64)
    wave = torch.cos(math.pi * (2 * i + 1) * frequency / (2 * size))
    coefficients = dct_rows(wave.unsqueeze(0))[0]
    expected = torch.zeros(size, dtype=torch.float64)
    expected[frequency] = math.sqrt(size / 2)  # ||wave|| = sqrt(N / 2), all of it on basis vector 5
    torch.testing.assert_close(coefficients, expected, rtol=0, atol=1e-12)


def gradient_on_columns(rows: int, size: int, columns: list[int], strengths: list[float]) -> torch.Tensor:
    """``sum_k strength_k a_k Q[:, c_k]^T`` + small noise: energy sits in the known DCT columns."""
    q = dct_matrix(size)
    torch.manual_seed(0)
    grad = 1e-3 * torch.randn(rows, size)
    for column, strength in zip(columns, strengths):
        grad += strength * torch.randn(rows, 1).sign() * q[:, column].unsqueeze(0)
    return grad


@pytest.mark.parametrize("backend", ["matmul", "fft"])
def test_selects_the_columns_holding_the_energy(backend):
    columns, strengths = [17, 3, 11], [3.0, 2.0, 1.0]  # alignment order: 17, 3, 11
    grad = gradient_on_columns(40, 24, columns, strengths)  # 40 x 24: std projects on the right (24)
    scores = alignment_scores(grad, dct_matrix(24) if backend == "matmul" else None, "right")
    torch.testing.assert_close(scores[17], torch.tensor(3.0 * 40), rtol=1e-3, atol=0)  # l1 of +-3 over 40 rows
    weight = torch.nn.Parameter(torch.zeros(40, 24))
    optimizer = DCTAdamW([{"params": [weight], "rank": 3, "dct_backend": backend}], lr=1e-2)
    weight.grad = grad
    optimizer.step()
    indices = optimizer.state[weight]["proj_right_indices"]
    assert indices.dtype == torch.int32 and indices.tolist() == columns
    # wide matrix: the left side (rows) is projected, on columns of the 24-point DCT
    wide = torch.nn.Parameter(torch.zeros(24, 40))
    wide_opt = DCTAdamW([{"params": [wide], "rank": 3, "dct_backend": backend}], lr=1e-2)
    wide.grad = grad.T.contiguous()
    wide_opt.step()
    assert wide_opt.state[wide]["proj_left_indices"].tolist() == columns
    assert "proj_right_indices" not in wide_opt.state[wide]
    # the update lies in the selected subspace: W = -step * Q[:, I] (...)
    q = dct_matrix(24)
    outside = torch.eye(24) - q[:, columns] @ q[:, columns].T
    assert (outside @ wide.detach()).abs().max() < 1e-6 < wide.detach().abs().max()


def test_shared_dct_matrix_is_counted_once():
    model = torch.nn.ModuleDict(
        {"a": torch.nn.Linear(8, 24), "b": torch.nn.Linear(24, 8), "c": torch.nn.Linear(16, 40)}
    )  # weights 24x8, 8x24 (shorter side 8, shared), 40x16 (16)
    weights = [model[k].weight for k in "abc"]
    optimizer = DCTAdamW([{"params": weights, "rank": 4}, {"params": [model[k].bias for k in "abc"]}])
    for weight in weights:
        weight.grad = torch.randn_like(weight)
    for k in "abc":
        model[k].bias.grad = torch.randn_like(model[k].bias)
    optimizer.step()
    assert sorted(optimizer.shared_buffers) == ["dct16:float32:cpu", "dct8:float32:cpu"]
    per_weight = sum(2 * 4 * max(w.shape) * 4 + 4 * 4 for w in weights)
    biases = sum(2 * model[k].bias.numel() * 4 for k in "abc")
    assert optim.state_bytes(optimizer) == per_weight + biases + (8 * 8 + 16 * 16) * 4
    for weight in weights:  # no float basis per weight: only moments and int32 indices
        kinds = {k: v.dtype for k, v in optimizer.state[weight].items() if isinstance(v, torch.Tensor)}
        assert kinds == {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, **index_key(weight)}

    fft = DCTAdamW([{"params": weights, "rank": 4, "dct_backend": "fft"}])  # no matrix stored at all
    fft.step()
    assert fft.shared_buffers == {} and optim.state_bytes(fft) == per_weight
    for weight in weights:
        basis = fft.projector_for(fft.param_groups[0]).basis(fft.state[weight], weight)
        generated = basis.left if basis.left is not None else basis.right
        assert torch.equal(generated, dct_matrix(min(weight.shape))[:, index_of(fft, weight)])


def index_of(optimizer, weight):
    state = optimizer.state[weight]
    return state.get("proj_left_indices", state.get("proj_right_indices")).long()


def index_key(weight: torch.Tensor) -> dict:
    side = "left" if weight.shape[0] < weight.shape[1] else "right"
    return {f"proj_{side}_indices": torch.int32}


def test_rotate_carries_kept_columns_and_starts_new_ones_at_zero():
    weight = torch.nn.Parameter(torch.zeros(30, 16))
    optimizer = DCTAdamW([{"params": [weight], "rank": 3, "update_proj_gap": 1}], lr=1e-2)  # rotate by default
    weight.grad = gradient_on_columns(30, 16, [2, 5, 9], [3.0, 2.0, 1.0])
    optimizer.step()
    state = optimizer.state[weight]
    old_indices = state["proj_right_indices"].tolist()
    old_avg, old_sq = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    grad = gradient_on_columns(30, 16, [9, 12, 2], [3.0, 2.0, 1.0])  # keeps 9 and 2, brings 12
    weight.grad = grad
    optimizer.step()
    new_indices = state["proj_right_indices"].tolist()
    assert new_indices == [9, 12, 2]
    low = grad @ dct_matrix(16)[:, new_indices]
    for j, index in enumerate(new_indices):
        carried = old_avg[:, old_indices.index(index)] if index in old_indices else torch.zeros(30)
        carried_sq = old_sq[:, old_indices.index(index)] if index in old_indices else torch.zeros(30)
        torch.testing.assert_close(state["exp_avg"][:, j], BETA1 * carried + (1 - BETA1) * low[:, j])
        torch.testing.assert_close(state["exp_avg_sq"][:, j], 0.999 * carried_sq + 0.001 * low[:, j] ** 2)


def test_error_feedback_delays_but_never_loses_gradient():
    weight = torch.nn.Parameter(torch.zeros(30, 16))
    group = {"params": [weight], "rank": 2, "update_proj_gap": 1, "error_feedback": True, "dct_backend": "fft"}
    optimizer = DCTAdamW([group], lr=1e-2)
    q = dct_matrix(16)
    first = gradient_on_columns(30, 16, [2, 5, 9], [3.0, 2.0, 1.0])  # rank 2: column 9 is left out
    weight.grad = first
    optimizer.step()
    state = optimizer.state[weight]
    assert state["proj_right_indices"].tolist() == [2, 5]
    buffer = state["error"].clone()
    torch.testing.assert_close(buffer, first - first @ q[:, [2, 5]] @ q[:, [2, 5]].T)
    second = gradient_on_columns(30, 16, [7], [0.5])  # weaker than what the buffer holds on column 9
    weight.grad = second
    optimizer.step()
    assert state["proj_right_indices"].tolist() == [9, 7]  # selected on G + Xi
    low = (second + buffer) @ q[:, [9, 7]]
    torch.testing.assert_close(state["exp_avg_sq"][:, 0], 0.001 * low[:, 0] ** 2)  # column 9 is new: no history
    # what entered the subspaces plus what is still buffered is exactly the sum of the gradients
    applied = first @ q[:, [2, 5]] @ q[:, [2, 5]].T + low @ q[:, [9, 7]].T
    torch.testing.assert_close(applied + state["error"], first + second, rtol=0, atol=1e-5)


def test_index_transition_equals_the_basis_product():
    q = dct_matrix(12)
    old_idx, new_idx = torch.tensor([4, 0, 7], dtype=torch.int32), torch.tensor([7, 1, 4], dtype=torch.int32)
    old = SelectedColumnsBasis(None, q[:, old_idx.long()], None, old_idx)
    new = SelectedColumnsBasis(None, q[:, new_idx.long()], None, new_idx)
    _, c_right = old.transition(new)
    torch.testing.assert_close(c_right, old.right.T @ new.right, rtol=0, atol=1e-6)
    assert torch.equal(c_right, torch.tensor([[0.0, 0, 1], [0, 0, 0], [1, 0, 0]]))


def test_defaults_follow_the_paper_and_the_authors_release():
    optimizer = optim.build(make_llama(), "dct", lr=1e-3, rank=8)
    group = optimizer.param_groups[0]
    keys = ("moment_policy", "scale", "update_proj_gap", "dct_backend", "error_feedback", "eps")
    assert tuple(group[k] for k in keys) == ("rotate", 1.0, 1, "matmul", False, 1e-8)


def test_eps_is_added_to_the_bias_corrected_second_moment():
    """The paper's update lr * m_hat / (sqrt(v_hat) + eps): on a gradient of entries ~1e-7 the
    same eps on the uncorrected sqrt(v) would give a step ~4x smaller at the first step."""
    weight = torch.nn.Parameter(torch.zeros(8, 16))
    lr, eps, (beta1, beta2) = 0.1, 1e-8, (0.9, 0.999)
    optimizer = DCTAdamW([{"params": [weight], "rank": 8, "update_proj_gap": 1}], lr=lr)
    grad = 1e-7 * torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    weight.grad = grad.clone()
    optimizer.step()
    basis = dct_matrix(8)[:, optimizer.state[weight]["proj_left_indices"].long()]  # 8 x 16: left, all 8 columns
    low = basis.T @ grad
    m_hat, v_hat = (1 - beta1) * low / (1 - beta1), (1 - beta2) * low**2 / (1 - beta2)
    expected = -lr * basis @ (m_hat / (v_hat.sqrt() + eps))
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-4, atol=1e-6)  # steps are ~lr = 0.1
    uncorrected = -lr * math.sqrt(1 - beta2) / (1 - beta1) * basis @ ((1 - beta1) * low / (((1 - beta2) * low**2).sqrt() + eps))
    assert (weight.detach() - uncorrected).abs().max() > 0.1 * expected.abs().max()


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"rank": 33}, r"rank 33 exceeds min\(m, n\) = 32"),
        ({"rank": 4, "dct_backend": "dst"}, "option dct_backend must be one of 'matmul', 'fft', got 'dst'"),
        ({"rank": 4, "moment_policy": "spin"}, "option moment_policy must be one of"),
        ({"rank": 4, "update_proj_gap": -1}, "update_proj_gap must be an integer >= 1"),
        ({"rank": 4, "error_feedback": 1}, "error_feedback must be True or False"),
    ],
)
def test_bad_input_raises_before_anything_changes(hparams, message):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        optim.build(model, "dct", lr=1e-3, **hparams)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_bf16_weights_use_a_bf16_basis():
    model = make_llama().to(torch.bfloat16)
    optimizer = optim.build(model, "dct", lr=1e-2, rank=4, update_proj_gap=1)
    before = model.lm_head.weight.detach().clone()
    for i in range(2):
        model(**make_batch(seed=i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert list(optimizer.shared_buffers) == ["dct32:bfloat16:cpu"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.lm_head.weight.dtype == torch.bfloat16 and not torch.equal(model.lm_head.weight, before)
