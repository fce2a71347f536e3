"""Common suite for every registered optimizer: one or more OptimizerCase rows per name.

The rows live in tests/cases/optim_*.py; a registered optimizer without a row fails
:func:`test_every_registered_optimizer_has_a_row`. Each row gives the hyperparameters and the
exact state bytes expected per parameter; the tests check that the weights the method itself
trains learn (with every other parameter frozen), the state-size formula, weights_only
checkpoints, resume equality, non-finite gradients, every dtype (fp64, bf16), and that the
declared options are what ``build`` checks and uses.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import make_batch, make_llama

import rankwise
from cases import collect
from cases.optimizer_case import OptimizerCase
from rankwise import optim
from rankwise.adapters.base import AdapterLayer
from rankwise.errors import RankwiseError

CASES: list[OptimizerCase] = collect("optim_")
IDS = [c.id for c in CASES]


def test_every_registered_optimizer_has_a_row():
    names = set(optim.names())
    rows = {c.name for c in CASES}
    assert names - rows == set(), f"registered optimizers without a row in tests/cases/optim_*.py: {names - rows}"
    assert rows - names == set(), f"rows naming unregistered optimizers: {rows - names}"


# ----- helpers --------------------------------------------------------------------------------


def make_model(case: OptimizerCase, *, seed: int = 0, dtype: torch.dtype | None = None):
    model = make_llama(seed=seed)
    if case.adapter is not None:
        rankwise.adapt(model, case.adapter, rank=4, alpha=8)  # scaling 2: every scaling path is exercised
    return model if dtype is None else model.to(dtype)


def build(case: OptimizerCase, model, **kwargs):
    return optim.build(model, case.name, lr=case.lr, **case.hparams, **kwargs)


def method_weights(case: OptimizerCase, model) -> dict[str, torch.nn.Parameter]:
    """The parameters the method itself trains: the targeted Linear weights (group 0), or the LoRA
    factors of the adapted layers."""
    if case.adapter is None:
        return dict(optim.split_parameters(model)[0])
    trained = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            factors = module.lora_parameters()
            trained.update({f"{name}.lora_A": factors.A, f"{name}.lora_B": factors.B})
    return trained


def method_shapes(case: OptimizerCase, model) -> list[tuple[int, int]]:
    """``(m, n)`` of every weight whose state ``case.weight_bytes`` describes."""
    if case.adapter is None:
        return [tuple(p.shape) for p in method_weights(case, model).values()]
    return [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, AdapterLayer)]


def other_parameters(case: OptimizerCase, model) -> list[torch.nn.Parameter]:
    trained = {id(p) for p in method_weights(case, model).values()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in trained]


def train(model, optimizer, steps: int, first_batch: int = 0) -> list[float]:
    losses = []
    for i in range(steps):
        loss = model(**make_batch(seed=first_batch + i)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


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


# ----- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loss_decreases(case):
    model = make_model(case)
    optimizer = build(case, model)
    batch = make_batch()
    losses = []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < case.loss_ratio * losses[0], losses


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_weight_the_method_trains_learns_with_the_rest_frozen(case):
    """Only the method's own weights train (embeddings, norms and head frozen): each of them
    moves by more than a tenth of one coordinate's single Adam step, and the loss on the batch
    falls below 0.985 of the first in 12 steps (the rows reach 0.88-0.97; nothing else can lower
    it, so weights that are never updated leave it at 1.0)."""
    model = make_model(case)
    trained = method_weights(case, model)
    trained_ids = {id(p) for p in trained.values()}
    for param in model.parameters():
        if id(param) not in trained_ids:
            param.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in trained.items()}
    optimizer = build(case, model)
    batch = make_batch()
    losses = []
    for _ in range(12):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    for name, param in trained.items():
        moved = torch.linalg.vector_norm(param.detach() - before[name]).item()
        assert moved > 0.1 * case.lr, f"{name} moved by {moved:.3g}"
    assert losses[-1] < 0.985 * losses[0], losses


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_runs_in_the_dtype_of_its_parameters(case, dtype):
    model = make_model(case, dtype=dtype)
    optimizer = build(case, model)
    trained = method_weights(case, model)
    before = {name: p.detach().clone() for name, p in trained.items()}
    train(model, optimizer, 3)
    for param in model.parameters():
        assert param.dtype == dtype and torch.isfinite(param).all()
    for name, param in trained.items():
        assert not torch.equal(param.detach(), before[name]), name
    for param, state in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq", "proj_left", "proj_right"):
            if key in state:  # float moments and bases follow the parameter (quantised ones are codes)
                assert state[key].dtype == param.dtype, (key, state[key].dtype)


# ----- state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_bytes_match_formula(case):
    model = make_model(case)
    optimizer = build(case, model)
    train(model, optimizer, 1)
    shapes = method_shapes(case, model)
    expected = sum(case.weight_bytes(*shape) for shape in shapes)
    expected += sum(case.other_bytes(p.numel()) for p in other_parameters(case, model))
    expected += case.shared_bytes(shapes)
    assert optim.state_bytes(optimizer) == expected
    if case.low_rank:
        baseline_model = make_model(case)
        baseline = optim.build(baseline_model, "adamw", lr=case.lr)
        train(baseline_model, baseline, 1)
        assert optim.state_bytes(optimizer) < optim.state_bytes(baseline)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_loads_with_weights_only(case):
    model = make_model(case)
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
    straight = make_model(case)
    straight_opt = build(case, straight)
    train(straight, straight_opt, 2 * k)

    first = make_model(case)
    first_opt = build(case, first)
    train(first, first_opt, k)
    model_state = roundtrip(first.state_dict())
    optim_state = roundtrip(first_opt.state_dict())

    resumed = make_model(case, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    resumed_opt = build(case, resumed)
    resumed_opt.load_state_dict(optim_state)
    train(resumed, resumed_opt, k, first_batch=k)

    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


GUARDED = [(c, i) for c, i in zip(CASES, IDS) if c.name != "adamw"]  # torch's AdamW has no guard


@pytest.mark.parametrize("case", [c for c, _ in GUARDED], ids=[i for _, i in GUARDED])
def test_nonfinite_gradient_never_reaches_the_weights(case):
    model = make_model(case)
    optimizer = build(case, model)
    train(model, optimizer, 2)
    model(**make_batch(seed=9)).loss.backward()
    weights = list(method_weights(case, model).values())
    poisoned, other = weights[0], weights[-1]
    poisoned.grad[0, 0] = float("nan")
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


# ----- declared options ----------------------------------------------------------------------


def invalid_value(option):
    """A value the declaration must refuse."""
    if option.choices is not None:
        return "not-a-choice"
    if option.kind is bool:
        return "yes"
    if option.kind is tuple:
        return 0.5
    if option.kind is str:
        return 3
    if option.low is not None:
        return option.low - 1
    return "x"


FIRST_ROWS = {c.name: c for c in reversed(CASES)}  # each name's first row


@pytest.mark.parametrize("name", sorted(FIRST_ROWS))
def test_declared_options_are_what_build_checks_and_uses(name):
    """Passing every declared default explicitly builds the same groups as passing nothing;
    a bad value of any declared option raises an error naming it, before anything is built."""
    case = FIRST_ROWS[name]
    declared = optim.method_options(name)
    assert {"lr", "betas", "eps", "weight_decay"} <= set(declared)
    for key, option in declared.items():
        assert option.help, key
    base = {k: v for k, v in case.hparams.items() if k == "rank"}  # the tiny model needs a small rank
    plain = optim.build(make_model(case), name, lr=case.lr, **base).param_groups
    defaults = {k: o.default for k, o in declared.items() if k not in ("lr", *base)}
    explicit = optim.build(make_model(case), name, lr=case.lr, **base, **defaults).param_groups
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]  # noqa: E731
    assert strip(plain) == strip(explicit)
    for key, option in declared.items():
        if key == "lr":
            continue
        model = make_model(case)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(RankwiseError, match=f"option {key} must be"):
            optim.build(model, name, lr=case.lr, **{**base, key: invalid_value(option)})
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unknown_hyperparameter_lists_the_accepted_ones(case):
    with pytest.raises(RankwiseError, match=r"unknown option\(s\) bogus; it accepts: .*eps"):
        optim.build(make_model(case), case.name, lr=1e-3, bogus=1)


def test_method_options_of_an_unknown_name_lists_the_known_ones():
    with pytest.raises(RankwiseError, match="known: adamw, .*galore"):
        optim.method_options("galor")


def test_registry_supports_agree_with_the_classes():
    for entry in optim.OPTIMIZERS.entries():
        assert ("layerwise" in entry.supports) == entry.obj.supports_layerwise, entry.name
        assert entry.supports <= {"layerwise", "ddp", "fsdp2", "loraplus"}, entry.name


def test_adamw_defaults_are_torchs_and_decay_the_weights():
    """eps 1e-8, betas (0.9, 0.999), weight_decay 0.01: with a zero gradient Adam's update is 0,
    so one step multiplies every weight by exactly 1 - lr * 0.01."""
    model = make_llama()
    optimizer = optim.build(model, "adamw", lr=0.1)
    for group in optimizer.param_groups:
        assert (group["eps"], group["betas"], group["weight_decay"]) == (1e-8, (0.9, 0.999), 0.01)
    before = [p.detach().clone() for p in model.parameters()]
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param, start in zip(model.parameters(), before):
        torch.testing.assert_close(param.detach(), start * (1 - 0.1 * 0.01), rtol=1e-7, atol=0)


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


def test_the_step_is_sealed():
    from rankwise.optim.lowrank import LowRankAdamW

    with pytest.raises(TypeError, match="seals"):
        type("Override", (LowRankAdamW,), {"step_parameter": lambda self, *a, **k: True})
