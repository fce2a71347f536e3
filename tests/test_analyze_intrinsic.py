"""The intrinsic dimension (a training diagnostic): a known answer on a constructed task, the
sweep's bookkeeping on the tiny LLaMA, the registry path and the refusals.

Known answer: a linear regression whose inputs span only 2 of 16 input directions, so the loss
depends on exactly 4 x 2 = 8 of the weight's 64 coordinates (isotropically). Training in a random
d-dimensional subspace reaches the optimum when the subspace's image in those 8 coordinates is
all of them -- d >= 8 -- and leaves a residual below that; so at a threshold of 0.999 the
intrinsic dimension is exactly 8.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_batch, make_llama
from rankwise.analyze import DIAGNOSTICS, IntrinsicDimension, intrinsic_dimension
from rankwise.errors import RankwiseError


class Regression(nn.Module):
    """``y = W x`` (4 x 16, no bias) with the mean squared error as its ``loss``; batches carry ``x`` as
    ``input_ids`` and ``y`` as ``labels`` (the shape rankwise's loop and evaluation expect)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(16, 4, bias=False)

    def forward(self, input_ids, labels):
        return SimpleNamespace(loss=(self.body(input_ids) - labels).square().mean())


def regression_task():
    target = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    x = torch.zeros(2, 16)
    x[0, 0], x[1, 1] = 1.0, 1.0  # inputs e_0, e_1: only W[:, :2] matters, each coordinate alike
    return [{"input_ids": x, "labels": x @ target.T}]


def test_the_intrinsic_dimension_of_an_8_coordinate_regression_is_8():
    model = Regression()
    before = model.body.weight.detach().clone()
    batches = regression_task()
    result = intrinsic_dimension(model, batches, batches, dimensions=(2, 4, 6, 8, 12), threshold=0.999,
                                 steps=200, lr=0.05, full_lr=0.05)
    assert torch.equal(model.body.weight, before)  # every run trained a copy
    assert result.full_loss < 1e-4 * result.base_loss  # full fine-tuning solves the regression
    assert result.dimension == 8 and float(result) == 8.0
    assert result.gain(6) < 0.999 <= result.gain(8) and result.gain(12) >= 0.999
    assert result.gain(2) < result.gain(4) < result.gain(6)  # a larger subspace captures more of the 8


def test_the_sweep_on_the_tiny_llama_through_the_registry():
    train = [make_batch(seed=s) for s in (1, 2)]
    evaluation = train  # random tokens: only the fit of the training batches can improve
    diagnostic = DIAGNOSTICS.get("intrinsic_dimension")(dimensions=(8, 512), steps=4, lr=1e-2, full_lr=1e-3)
    measured = diagnostic.measure(make_llama(), train, evaluation)
    result = intrinsic_dimension(make_llama(), train, evaluation, dimensions=(8, 512), steps=4, lr=1e-2,
                                 full_lr=1e-3)
    assert isinstance(result, IntrinsicDimension) and set(result.losses) == {8, 512}
    assert measured == result.dimension  # the same deterministic runs
    assert result.full_loss < result.base_loss
    assert all(loss < result.base_loss for loss in result.losses.values())
    if result.dimension is None:
        assert all(result.gain(d) < 0.9 for d in result.losses)
    else:
        assert result.gain(result.dimension) >= 0.9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dimensions": (64, 16)}, "dimensions must be strictly ascending"),
        ({"threshold": 1.5}, "threshold must be a number in \\(0, 1\\]"),
        ({"train_batches": []}, "train_batches must be a non-empty list of batch dicts"),
        ({"full_lr": 1e-12, "steps": 1}, "full fine-tuning did not lower the evaluation loss"),
    ],
)
def test_bad_sweeps_are_refused(kwargs, message):
    batches = regression_task()
    arguments = {"train_batches": batches, "eval_batches": batches, "dimensions": (2,), "steps": 2, **kwargs}
    with pytest.raises(RankwiseError, match=message):
        intrinsic_dimension(Regression(), **arguments)


def test_a_model_holding_adapters_is_refused():
    from rankwise.adapters import adapt

    model = adapt(make_llama(), "lora", rank=2)
    with pytest.raises(RankwiseError, match="needs the plain model: it holds adapters"):
        intrinsic_dimension(model, [make_batch()], [make_batch()], dimensions=(4,), steps=1)
