"""Pretraining parametrisations: the registry's common suite, then lowrank's init scale and errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cases import collect
from conftest import make_batch, make_llama
from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear
from rankwise.pretrain import PARAMETRISATIONS, method_options, parametrize

RANK = 4
CASES = collect("pretrain_")
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear the default targets select (all but the head)."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n != "lm_head"}


def replaced(model: nn.Module, names) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in names}


# ----- the common suite: every registered parametrisation -----------------------------------


def test_every_registered_parametrisation_has_a_row():
    missing = set(PARAMETRISATIONS.names()) - {c.method for c in CASES}
    assert not missing, f"parametrisations without a row in tests/cases/pretrain_*.py: {sorted(missing)}"


@cases
def test_trainable_parameters_follow_the_formula_and_only_replaced_layers_change(case):
    model = make_llama()
    shapes = dense_shapes(model)
    head = model.lm_head
    before = n_params(model)
    parametrize(model, case.method, rank=RANK, **case.options)
    layers = replaced(model, shapes)
    assert model.lm_head is head
    for name, layer in layers.items():
        assert not isinstance(layer, nn.Linear), name
        out_features, in_features = shapes[name]
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert trainable == case.trainable_per_layer(in_features, out_features, RANK), name
    removed = sum(m * n for m, n in shapes.values())
    added = sum(case.trainable_per_layer(n, m, RANK) for m, n in shapes.values())
    assert n_params(model) == before - removed + added


@cases
def test_forward_is_the_dense_matrix_the_layer_represents(case):
    model = make_llama()
    shapes = dense_shapes(model)
    parametrize(model, case.method, rank=RANK, **case.options)
    gen = torch.Generator().manual_seed(0)
    for name, layer in replaced(model, shapes).items():
        weight = layer.dense_weight().detach()
        assert weight.shape == shapes[name]
        x = torch.randn(3, 5, weight.shape[1], generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-5, atol=1e-6)  # LLaMA's Linears have no bias


@cases
def test_gradients_reach_every_trainable_part_and_the_replaced_layers_alone_learn(case):
    torch.manual_seed(0)
    model = make_llama()
    shapes = dense_shapes(model)
    parametrize(model, case.method, rank=RANK, **case.options)
    layers = replaced(model, shapes)
    batch = make_batch()
    model.train()
    # Only the replaced layers train: embeddings, norms and the head cannot do the learning.
    optimizer = torch.optim.AdamW([p for layer in layers.values() for p in layer.parameters() if p.requires_grad],
                                  lr=1e-2)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if step == 0:
            for name, layer in layers.items():
                for key, parameter in layer.named_parameters():
                    if parameter.requires_grad:
                        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name}.{key}"
        optimizer.step()
        losses.append(loss.item())
    # lowrank, measured: 4.87 -> 4.63 over these 8 steps (seeded and global-RNG rows alike)
    assert losses[-1] < losses[0] - 0.1, losses


@cases
def test_state_dict_round_trips_through_safetensors(case, tmp_path):
    model = parametrize(make_llama(), case.method, rank=RANK, **case.options)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh = parametrize(make_llama(seed=1), case.method, rank=RANK, **case.options)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


@cases
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_replaced_layers_keep_the_model_dtype(case, dtype):
    model = parametrize(make_llama().to(dtype), case.method, rank=RANK, **case.options)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.isfinite(model(**make_batch()).logits).all()


@cases
def test_unknown_options_and_a_rank_too_large_leave_the_model_untouched(case):
    model = make_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    accepted = ", ".join(f"{k}={o.default!r}" for k, o in sorted(method_options(case.method).items()))
    with pytest.raises(RankwiseError, match=rf"unknown option\(s\) colour; it accepts: {accepted}"):
        parametrize(model, case.method, rank=RANK, colour="red", **case.options)
    with pytest.raises(RankwiseError, match="exceeds min"):
        parametrize(model, case.method, rank=33, **case.options)
    assert all(isinstance(m, nn.Linear) for n, m in model.named_modules() if n in dense_shapes(make_llama()))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----- lowrank ----------------------------------------------------------------------------------


def test_lowrank_parameter_count_per_layer_with_and_without_bias(llama):
    dense = {
        n: (m.out_features, m.in_features, m.bias is not None)
        for n, m in llama.named_modules()
        if isinstance(m, nn.Linear)
    }
    before = n_params(llama)
    parametrize(llama, "lowrank", rank=4)
    removed = added = 0
    for name, (m, n, has_bias) in dense.items():
        if name == "lm_head":
            assert isinstance(llama.lm_head, nn.Linear)
            continue
        layer = llama.get_submodule(name)
        assert isinstance(layer, FactorizedLinear) and layer.rank == 4
        assert n_params(layer) == 4 * (m + n) + (m if has_bias else 0)
        removed += m * n
        added += 4 * (m + n)
    assert n_params(llama) == before - removed + added

    with_bias = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))
    bias = with_bias[0].bias.detach().clone()
    parametrize(with_bias, "lowrank", rank=2)
    assert n_params(with_bias[0]) == 2 * (10 + 6) + 6 and n_params(with_bias[2]) == 2 * (6 + 3)
    assert torch.equal(with_bias[0].bias.detach(), bias)


@pytest.mark.parametrize("init_std, shape, rank", [(0.02, (256, 512), 16), (None, (384, 128), 8)])
def test_lowrank_product_matches_dense_init_variance(init_std, shape, rank):
    torch.manual_seed(0)
    out_features, in_features = shape
    model = nn.Sequential(nn.Linear(in_features, out_features))
    if init_std is not None:  # the LLaMA init N(0, 0.02^2); otherwise nn.Linear's Kaiming-uniform
        nn.init.normal_(model[0].weight, std=init_std)
    dense_var = model[0].weight.detach().pow(2).mean().item()
    parametrize(model, "lowrank", rank=rank, seed=0)
    layer = model[0]
    product_var = layer.dense_weight().detach().pow(2).mean().item()
    assert product_var == pytest.approx(dense_var, rel=0.1)
    up_norm, down_norm = layer.up.weight.detach().pow(2).sum().item(), layer.down.weight.detach().pow(2).sum().item()
    assert up_norm == pytest.approx(down_norm, rel=0.1)  # balanced factors


def test_lowrank_seed_is_reproducible_and_dtype_follows_model(llama):
    a, b = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))
    b.load_state_dict(a.state_dict())
    parametrize(a, "lowrank", rank=3, seed=7)
    parametrize(b, "lowrank", rank=3, seed=7)
    assert torch.equal(a[0].up.weight, b[0].up.weight) and torch.equal(a[0].down.weight, b[0].down.weight)

    parametrize(llama.to(torch.bfloat16), "lowrank", rank=4)
    layer = llama.model.layers[0].mlp.gate_proj
    assert layer.up.weight.dtype == torch.bfloat16 == layer.down.weight.dtype


def test_lowrank_training_lowers_the_loss(llama, batch):
    torch.manual_seed(0)
    parametrize(llama, "lowrank", rank=4, seed=0)
    llama.train()
    optimizer = torch.optim.AdamW(llama.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = llama(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        layer = llama.model.layers[0].self_attn.v_proj
        assert layer.up.weight.grad.abs().sum() > 0 and layer.down.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "option rank must be an integer >= 1, got 0"),
        (dict(rank=-3), "option rank must be an integer >= 1"),
        (dict(rank=2.5), "option rank must be an integer >= 1"),
        (dict(rank=True), "option rank must be an integer >= 1"),
        (dict(rank=33), "exceeds min"),
        (dict(rank=4, targets=["nope"]), "matched no Linear"),
        (dict(rank=4, sparsity=0.1), r"'lowrank': unknown option\(s\) sparsity; it accepts: seed=None"),
        (dict(rank=4, seed="x"), "option seed must be None or an integer, got 'x'"),
    ],
)
def test_bad_calls_raise_and_leave_model_untouched(llama, kwargs, message):
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        parametrize(llama, "lowrank", **kwargs)
    assert not any(isinstance(m, FactorizedLinear) for m in llama.modules())
    assert all(torch.equal(v, state[k]) for k, v in llama.state_dict().items())


def test_unknown_parametrisation_lists_known(llama):
    with pytest.raises(RankwiseError, match="unknown pretraining parametrisation 'galore'; known: .*lowrank"):
        parametrize(llama, "galore", rank=4)
    assert "lowrank" in PARAMETRISATIONS


def test_already_factorized_layers_are_not_parametrized_twice(llama):
    parametrize(llama, "lowrank", rank=4)
    with pytest.raises(RankwiseError, match="already FactorizedLinear"):
        parametrize(llama, "lowrank", rank=2)
