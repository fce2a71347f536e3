"""Layerwise mode (rankwise.optim.layerwise) for every registered optimizer that supports it.

Driven by the registry: every optimizer whose entry supports ``"layerwise"`` runs each of its
rows of the common table (tests/cases/optim_*.py); a name without a row fails, and every other
name must be refused in layerwise mode. In layerwise mode a row must give the parameters of
the ordinary optimizer: step by step without accumulation, and with N micro-batches of loss /
N equal to ordinary accumulation exactly and to one step on the concatenated batch. Also:
gradients never coexist, reentrant gradient checkpointing counts one backward per
micro-batch, schedulers drive the hooks' learning rate, checkpoints resume, bad options raise
before anything changes.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import make_batch, make_llama
from test_optim import make_model
from torch.utils.checkpoint import checkpoint

from cases import collect
from rankwise import optim
from rankwise.errors import RankwiseError

ROWS = collect("optim_")
LAYERWISE = sorted(entry.name for entry in optim.OPTIMIZERS.entries() if "layerwise" in entry.supports)
CASES = [c for c in ROWS if c.name in LAYERWISE]
IDS = [c.id for c in CASES]


def test_every_layerwise_optimizer_has_a_row():
    assert {c.name for c in ROWS} <= set(optim.names()), "a row names an unregistered optimizer"
    assert set(LAYERWISE) == {c.name for c in CASES}


@pytest.mark.parametrize("case", [c for c in ROWS if c.name not in LAYERWISE], ids=lambda c: c.id)
def test_optimizers_without_layerwise_support_are_refused(case):
    model = make_model(case)
    with pytest.raises(RankwiseError, match="cannot run layerwise"):
        optim.build(model, case.name, lr=case.lr, **case.hparams, layerwise=True)
    assert hooks_of(model) == 0


def build(case, model, **kwargs):
    return optim.build(model, case.name, lr=case.lr, **case.hparams, **kwargs)


def micro_batches(step: int, count: int) -> list[dict]:
    """The concatenated batch of ``step`` split into ``count`` equal micro-batches."""
    full = make_batch(seed=step, batch=2 * count)
    return [{k: v[i::count] for k, v in full.items()} for i in range(count)]


def train_full_batch(model, optimizer, steps: int, count: int, scheduler=None) -> None:
    for step in range(steps):
        model(**make_batch(seed=step, batch=2 * count)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def train_micro_batches(model, optimizer, steps: int, count: int, scheduler=None, first: int = 0) -> None:
    """The unchanged loop of a non-layerwise run: step() / zero_grad() after every micro-batch."""
    for step in range(first, first + steps):
        for micro in micro_batches(step, count):
            (model(**micro).loss / count).backward()
            optimizer.step()
            optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def assert_same_parameters(a, b, atol: float) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layerwise_steps_like_the_optimizer(case):
    plain, layerwise = make_llama(), make_llama()
    plain_opt, layerwise_opt = build(case, plain), build(case, layerwise, layerwise=True)
    train_full_batch(plain, plain_opt, 4, 1)
    train_full_batch(layerwise, layerwise_opt, 4, 1)
    assert_same_parameters(plain, layerwise, atol=1e-6)
    assert optim.state_bytes(layerwise_opt) == optim.state_bytes(plain_opt)
    assert all(p.grad is None for p in layerwise.parameters())


def assert_trajectory_close(actual, expected, initial, tolerance: float | None, *, atol: float, what: str) -> None:
    """``actual == expected`` to ``atol``; with a ``tolerance`` (rows whose update is discontinuous
    in the gradient, see OptimizerCase.accumulation_tolerance) the two must instead agree on the
    change from ``initial`` to that share of it in Frobenius norm."""
    if tolerance is not None:
        error = torch.linalg.vector_norm(actual - expected).item()
        moved = torch.linalg.vector_norm(expected - initial).item()
        assert error <= tolerance * moved + atol, f"{what}: off by {error:.3g} for a change of {moved:.3g}"
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda detail: f"{what}: {detail}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_accumulated_micro_batches_equal_one_full_batch(case):
    layerwise = make_llama()
    train_micro_batches(layerwise, build(case, layerwise, layerwise=True, accumulation_steps=2), 3, 2)
    ordinary = make_llama()  # ordinary accumulation: the loop steps every 2nd micro-batch
    ordinary_opt = build(case, ordinary)
    for step in range(3):
        for micro in micro_batches(step, 2):
            (ordinary(**micro).loss / 2).backward()
        ordinary_opt.step()
        ordinary_opt.zero_grad()
    assert_same_parameters(ordinary, layerwise, atol=1e-6)
    full = make_llama()
    train_full_batch(full, build(case, full), 3, 2)
    for (name, a), b, start in zip(full.named_parameters(), layerwise.parameters(), make_llama().parameters()):
        assert_trajectory_close(b, a, start, case.accumulation_tolerance, atol=1e-5, what=name)


class Checkpointed(torch.nn.Module):
    """Four Linear layers, each recomputed in backward by torch.utils.checkpoint when ``reentrant``
    is not None (use_reentrant=True runs a nested backward pass per segment)."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            block = lambda h, layer=layer: torch.tanh(layer(h))  # noqa: E731
            x = block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant)
        return x


def checkpointed_run(name: str, reentrant: bool | None, accumulation: int, steps: int = 3) -> list[torch.Tensor]:
    model = Checkpointed(reentrant)
    optimizer = optim.build(model, name, lr=1e-2, layerwise=True, accumulation_steps=accumulation,
                            **({"rank": 2, "update_proj_gap": 2} if name == "galore" else {}))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for _ in range(accumulation):
            x = torch.randn(4, 8, generator=gen).requires_grad_()  # reentrant checkpoints need an input that requires grad
            (model(x).square().mean() / accumulation).backward()
    assert optimizer.state[model.layers[0].weight]["step"] == steps
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["galore", "adamw"])
@pytest.mark.parametrize("accumulation", [2, 3])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_counts_one_backward_per_micro_batch(name, accumulation, reentrant):
    """Reentrant checkpointing runs a nested backward per segment: only the outermost one counts."""
    plain = checkpointed_run(name, None, accumulation)
    for a, b in zip(plain, checkpointed_run(name, reentrant, accumulation)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7)


def test_gradients_never_coexist():
    model = make_llama()
    params = list(model.parameters())
    live: list[int] = []
    for param in params:  # registered before the optimizer's hooks: runs just before each parameter is stepped
        param.register_post_accumulate_grad_hook(lambda _: live.append(sum(p.grad is not None for p in params)))
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4, layerwise=True)
    model(**make_batch()).loss.backward()
    optimizer.step()
    assert len(live) == len(params) and max(live) == 1


def test_gradients_accumulate_until_the_last_micro_batch():
    model = make_llama()
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4, layerwise=True, accumulation_steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    first, second, third = micro_batches(0, 3)
    model(**first).loss.backward()
    model(**second).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model(**third).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_parameter_missing_from_the_last_micro_batch_is_stepped_at_the_end_of_backward():
    model = make_llama()
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4, layerwise=True, accumulation_steps=2)
    head = model.lm_head.weight
    before = head.detach().clone()
    model(**make_batch(seed=0)).loss.backward()
    head.requires_grad_(False)  # the second micro-batch gives lm_head no gradient
    model(**make_batch(seed=1)).loss.backward()
    head.requires_grad_(True)
    assert head.grad is None and not torch.equal(head, before)
    assert optimizer.state[head]["step"] == 1


def test_flush_steps_an_unfinished_window():
    model = make_llama()
    optimizer = optim.build(model, "adamw", lr=1e-2, layerwise=True, accumulation_steps=4)
    weight = model.model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    model(**make_batch()).loss.backward()
    optimizer.flush()
    assert weight.grad is None and not torch.equal(weight, before)
    model(**make_batch(seed=1)).loss.backward()  # a new window: accumulates again
    assert weight.grad is not None


def test_scheduler_changes_the_learning_rate_the_hooks_use():
    multiplier = [1.0, 0.5, 0.0, 0.0]
    models, optimizers = [], []
    for layerwise in (False, True):
        model = make_llama()
        optimizer = optim.build(model, "galore", lr=1e-2, rank=4, update_proj_gap=2, layerwise=layerwise)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: multiplier[s])
        train_full_batch(model, optimizer, 2, 1, scheduler)
        models.append(model)
        optimizers.append(optimizer)
    assert_same_parameters(*models, atol=1e-6)
    assert optimizers[1].optimizer.param_groups[0]["lr"] == 0.0
    frozen = [p.detach().clone() for p in models[1].parameters()]
    train_full_batch(models[1], optimizers[1], 1, 1)  # lr 0 now: the hooks must not move anything
    assert all(torch.equal(a, b) for a, b in zip(frozen, models[1].parameters()))


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def make_run(name: str, seed: int = 0, **hparams):
    model = make_llama(seed=seed)
    optimizer = optim.build(model, name, lr=1e-2, layerwise=True, accumulation_steps=2, **hparams)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


@pytest.mark.parametrize("name, hparams", [("galore", {"rank": 4, "update_proj_gap": 2}), ("adamw", {})])
def test_layerwise_resume_with_scheduler_reproduces_the_trajectory(name, hparams):
    straight = make_run(name, **hparams)
    train_micro_batches(*straight[:2], 4, 2, straight[2])

    first = make_run(name, **hparams)
    train_micro_batches(*first[:2], 2, 2, first[2])
    checkpoint = roundtrip({"model": first[0].state_dict(), "optim": first[1].state_dict(),
                            "sched": first[2].state_dict()})

    resumed = make_run(name, seed=7, **hparams)
    resumed[0].load_state_dict(checkpoint["model"])
    resumed[1].load_state_dict(checkpoint["optim"])
    resumed[2].load_state_dict(checkpoint["sched"])
    train_micro_batches(*resumed[:2], 2, 2, resumed[2], first=2)
    assert_same_parameters(straight[0], resumed[0], atol=1e-6)
    assert resumed[1].param_groups[0]["lr"] == straight[1].param_groups[0]["lr"]


def test_layerwise_checkpoint_loads_into_an_ordinary_optimizer():
    model = make_llama()
    layerwise = optim.build(model, "galore", lr=1e-2, rank=4, layerwise=True)
    train_full_batch(model, layerwise, 2, 1)
    plain = optim.build(model, "galore", lr=1e-2, rank=4)
    plain.load_state_dict(roundtrip(layerwise.state_dict()))
    assert optim.state_bytes(plain) == optim.state_bytes(layerwise)


def hooks_of(model) -> int:
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layerwise": True, "accumulation_steps": 0}, "accumulation_steps must be an integer >= 1"),
        ({"layerwise": True, "accumulation_steps": 1.5}, "accumulation_steps must be an integer >= 1"),
        ({"accumulation_steps": 2}, "applies to layerwise mode"),
        ({"layerwise": True, "max_grad_norm": 1.0}, "cannot honour max_grad_norm"),
    ],
)
def test_options_layerwise_cannot_honour_raise_before_any_change(kwargs, match):
    model = make_llama()
    with pytest.raises(RankwiseError, match=match):
        optim.build(model, "galore", lr=1e-2, rank=4, **kwargs)
    assert hooks_of(model) == 0


def test_closure_is_refused():
    model = make_llama()
    optimizer = optim.build(model, "adamw", lr=1e-2, layerwise=True)
    with pytest.raises(RankwiseError, match="closure"):
        optimizer.step(lambda: model(**make_batch()).loss)


def test_optimizer_that_needs_every_gradient_is_refused():
    model = make_llama()
    optimizer = optim.build(model, "galore", lr=1e-2, rank=4)
    optimizer.supports_layerwise = False
    with pytest.raises(RankwiseError, match="cannot run layerwise"):
        optim.LayerwiseOptimizer(optimizer)
    assert hooks_of(model) == 0


def test_remove_hooks_detaches_from_the_model():
    model = make_llama()
    optimizer = optim.build(model, "adamw", lr=1e-2, layerwise=True)
    optimizer.remove_hooks()
    assert hooks_of(model) == 0
