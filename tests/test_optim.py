"""Common suite for every registered optimizer: one OptimizerCase row per name.

Each row gives the hyperparameters and the exact state bytes expected per parameter; the
tests check loss decrease, the state-size formula, weights_only checkpoints, resume
equality and that non-finite gradients never reach the weights.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import make_batch, make_llama

from cases import collect
from cases.optimizer_case import OptimizerCase
from rankwise import optim
from rankwise.errors import RankwiseError

CASES = collect("optim_")
IDS = [f"{c.name}-{'-'.join(f'{k}={v}' for k, v in c.hparams.items())}" for c in CASES]


def train(model, optimizer, steps: int, first_batch: int = 0) -> list[float]:
    losses = []
    for i in range(steps):
        loss = model(**make_batch(seed=first_batch + i)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def build(case: OptimizerCase, model):
    return optim.build(model, case.name, lr=case.lr, **case.hparams)


def test_every_registered_name_has_a_row():
    # Optimizers built from an adapted model (LoRA-Pro) have their own suite.
    plain = {n for n in optim.names() if not getattr(optim.OPTIMIZERS.get(n), "takes_model", False)}
    assert {c.name for c in CASES} == plain


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loss_decreases(case):
    model = make_llama()
    optimizer = build(case, model)
    batch = make_batch()
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_bytes_match_formula(case):
    model = make_llama()
    optimizer = build(case, model)
    train(model, optimizer, 1)
    projected, others = optim.split_parameters(model)
    expected = sum(case.weight_bytes(*p.shape) for _, p in projected)
    expected += sum(case.other_bytes(p.numel()) for p in others)
    expected += case.shared_bytes([tuple(p.shape) for _, p in projected])
    assert optim.state_bytes(optimizer) == expected
    if case.low_rank:
        baseline_model = make_llama()
        baseline = optim.build(baseline_model, "adamw", lr=case.lr)
        train(baseline_model, baseline, 1)
        assert optim.state_bytes(optimizer) < optim.state_bytes(baseline)


def roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_loads_with_weights_only(case):
    model = make_llama()
    optimizer = build(case, model)
    train(model, optimizer, 3)
    state = optimizer.state_dict()
    assert_same(state, roundtrip(state))


def test_load_state_dict_keeps_saved_dtypes():
    """torch casts floating-point params' state to their dtype; integer or quantised state must survive."""
    model = make_llama()
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4)
    train(model, optimizer, 1)
    weight = model.model.layers[0].self_attn.q_proj.weight
    optimizer.state[weight]["proj_indices"] = torch.tensor([300, 7, 2**20 + 1])  # not exact in bf16 / fp32-cast ints
    optimizer.state[weight]["codes"] = torch.tensor([0, 255], dtype=torch.uint8)
    fresh = optim.build(make_llama(), "galore", lr=1e-2, rank=4)
    fresh.load_state_dict(roundtrip(optimizer.state_dict()))
    assert_same(optimizer.state_dict(), fresh.state_dict())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resume_reproduces_the_trajectory(case):
    k = 3
    straight = make_llama()
    straight_opt = build(case, straight)
    train(straight, straight_opt, 2 * k)

    first = make_llama()
    first_opt = build(case, first)
    train(first, first_opt, k)
    model_state = roundtrip(first.state_dict())
    optim_state = roundtrip(first_opt.state_dict())

    resumed = make_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    resumed_opt = build(case, resumed)
    resumed_opt.load_state_dict(optim_state)
    train(resumed, resumed_opt, k, first_batch=k)

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


GUARDED = [(c, i) for c, i in zip(CASES, IDS) if c.name != "adamw"]  # torch's AdamW has no guard


@pytest.mark.parametrize("case", [c for c, _ in GUARDED], ids=[i for _, i in GUARDED])
def test_nonfinite_gradient_never_reaches_the_weights(case):
    model = make_llama()
    optimizer = build(case, model)
    train(model, optimizer, 2)
    model(**make_batch(seed=9)).loss.backward()
    poisoned = model.model.layers[0].self_attn.q_proj.weight
    poisoned.grad[0, 0] = float("nan")
    other = model.model.layers[1].mlp.down_proj.weight
    before, other_before = poisoned.detach().clone(), other.detach().clone()
    state_before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[poisoned].items()}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step()
    assert torch.equal(poisoned, before)
    assert_same(state_before, dict(optimizer.state[poisoned]))
    assert not torch.equal(other, other_before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer.zero_grad()
    model(**make_batch(seed=10)).loss.backward()
    poisoned.grad[1, 1] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once already
        optimizer.step()
    assert torch.equal(poisoned, before)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unknown_hyperparameter_lists_the_accepted_ones(case):
    with pytest.raises(RankwiseError, match=r"unknown option\(s\) bogus; it accepts: .*eps"):
        optim.build(make_llama(), case.name, lr=1e-3, bogus=1)


def test_unknown_name_lists_known_names():
    with pytest.raises(RankwiseError, match="adamw, .*galore"):
        optim.build(make_llama(), "no-such-optimizer", lr=1e-3)


def test_groups_split_targets_from_the_rest():
    model = make_llama()
    optimizer = optim.build(model, "galore", lr=1e-3, rank=4, targets=["q_proj", "v_proj"])
    group0, group1 = optimizer.param_groups
    q = model.model.layers[0].self_attn.q_proj.weight
    assert len(group0["params"]) == 4 and any(p is q for p in group0["params"]) and group0["rank"] == 4
    assert "rank" not in group1
    assert len(group0["params"]) + len(group1["params"]) == len(list(model.parameters()))
