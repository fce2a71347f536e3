"""Multi-tensor (foreach) kernels of the optimizers' element-wise parts.

``optimizer.step()`` runs Adam's moments, the unprojected group's update and the weight
decay with torch's ``_foreach`` kernels over each group; ``step_parameter`` (layerwise mode's
path) runs them one tensor at a time. Every registered low-rank optimizer must give the same
trajectory both ways (the reference-package oracle tests -- galore-torch, fira,
apollo-torch in test_optim_galore_oracle.py, test_optim_fira.py, test_optim_apollo.py -- run
against step()).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch
from test_optim import CASES, IDS, make_model

from rankwise import optim
from rankwise.optim.inner import AdamMoments
from rankwise.optim.lowrank import LowRankAdamW

LOW_RANK = [(c, i) for c, i in zip(CASES, IDS) if c.name != "adamw" and c.adapter is None]


def train_both_ways(case, steps: int = 5):
    models = make_model(case), make_model(case)
    options = {**case.hparams, "weight_decay": 0.05}  # the decay runs too
    grouped, single = (optim.build(m, case.name, lr=case.lr, **options) for m in models)
    assert isinstance(grouped, LowRankAdamW)
    for i in range(steps):
        for model, opt, by_parameter in ((models[0], grouped, False), (models[1], single, True)):
            model(**make_batch(seed=i)).loss.backward()
            if by_parameter:
                for group in opt.param_groups:
                    for param in group["params"]:
                        if param.grad is not None:
                            opt.step_parameter(param, group)
            else:
                opt.step()
            opt.zero_grad()
    return models


@pytest.mark.parametrize("case", [c for c, _ in LOW_RANK], ids=[i for _, i in LOW_RANK])
def test_grouped_step_equals_the_per_tensor_path(case):
    grouped, single = train_both_ways(case)
    for (name, a), b in zip(grouped.named_parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_adam_moments_use_multi_tensor_kernels_and_match_update():
    torch.manual_seed(0)
    grads = [torch.randn(5, 7), torch.randn(3), torch.randn(5, 7, dtype=torch.float64)]
    group = {"betas": (0.9, 0.99), "eps": 1e-8, "lr": 0.1, "correct_bias": True}
    many_states = [{"step": 2, "exp_avg": g * 0.5, "exp_avg_sq": g * g} for g in grads]
    one_states = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()} for st in many_states]
    calls = []
    original = torch._foreach_mul_
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "_foreach_mul_", lambda *a, **k: calls.append(len(a[0])) or original(*a, **k))
        together = AdamMoments().update_many(many_states, grads, group)
    assert calls and max(calls) == 2  # the two float32 tensors share one launch; float64 has its own
    for (direction, size), state, grad in zip(together, one_states, grads):
        expected, expected_size = AdamMoments().update(state, grad, group)
        assert size == expected_size
        torch.testing.assert_close(direction, expected, rtol=0, atol=0)


def test_subclass_with_its_own_update_keeps_its_formula():
    """An Adam variant that overrides ``update`` (DCT's eps placement) is not replaced by the kernels."""

    class HalfAdam(AdamMoments):
        def update(self, state, grad, group):
            direction, size = super().update(state, grad, group)
            return direction * 0.5, size

    grads = [torch.ones(3), torch.ones(3)]
    group = {"betas": (0.9, 0.99), "eps": 1e-8, "lr": 0.1, "correct_bias": False}
    result = HalfAdam().update_many([{"step": 1}, {"step": 1}], grads, group)
    plain = AdamMoments().update({"step": 1}, torch.ones(3), group)[0]
    for direction, _ in result:
        torch.testing.assert_close(direction, plain * 0.5)
