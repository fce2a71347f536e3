"""Pretraining parametrisations: parameter counts, init scale, training, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.nn import FactorizedLinear
from rankwise.pretrain import PARAMETRISATIONS, parametrize


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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
        (dict(rank=0), "positive integer"),
        (dict(rank=-3), "positive integer"),
        (dict(rank=2.5), "positive integer"),
        (dict(rank=True), "positive integer"),
        (dict(rank=33), "exceeds min"),
        (dict(rank=4, targets=["nope"]), "matched no Linear"),
        (dict(rank=4, sparsity=0.1), "accepted options: seed"),
        (dict(rank=4, seed="x"), "seed"),
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
