"""Whole-model subspace training: the seeded projections of rankwise.linalg.subspace and SAID.

Projections: the Walsh-Hadamard butterflies equal the Sylvester matrix, a Fastfood block is
``H G Pi H B / (sqrt(d') ||g||)`` built from its own diagonals (unit columns), the entry variances
are ``1/d'`` (Fastfood) and ``1/d`` (sparse, density ``1/sqrt(D)``), and a seed fixes them bit for
bit. SAID: ``W_l = W0_l + lambda_l reshape(P_l theta)`` with one ``theta`` for every layer, the
gradient of ``theta`` is ``sum_l lambda_l P_l^T vec(dL/dW_l)`` (full fine-tuning gradients as the
oracle), and the saved file holds ``theta`` once, the scalars and the seed -- no projection.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import make_llama
from rankwise.adapters import adapt, adapter_layers, load_adapter, save_adapter, trainable_parameters
from rankwise.linalg.subspace import FastfoodProjection, SparseProjection, hadamard_transform

ATOL = 1e-5


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 32, 128, 512])  # one matmul up to 64, butterflies above
def test_hadamard_transform_is_the_sylvester_matrix(n):
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ sylvester(n))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.randn(2, 6))


def test_a_fastfood_block_is_H_G_Pi_H_B_with_unit_columns():
    projection = FastfoodProjection(rows=20, dimension=5, seed=3, dtype=torch.float64)
    assert projection.width == 8 and projection.signs.shape == (3, 8)  # ceil(20 / 8) blocks of 8
    dense = projection.dense()
    h = sylvester(8)
    for block in range(3):
        signs, gaussian = projection.signs[block], projection.gaussian[block]
        permute = torch.eye(8, dtype=torch.float64)[projection.permutation[block]]  # (Pi x)_i = x_perm[i]
        matrix = (h @ torch.diag(gaussian) @ permute @ h @ torch.diag(signs))[:, :5]
        rows = slice(8 * block, min(8 * block + 8, 20))
        torch.testing.assert_close(dense[rows], matrix[: rows.stop - rows.start])
        torch.testing.assert_close(matrix.norm(dim=0), torch.ones(5, dtype=torch.float64))


def test_projection_entry_variances_and_sparsity():
    rows = 1 << 14
    fastfood = FastfoodProjection(rows, 16, seed=0, dtype=torch.float64).dense()
    assert fastfood.square().mean().item() == pytest.approx(1 / 16, rel=0.02)
    sparse = SparseProjection(rows, 16, seed=0, dtype=torch.float64)
    dense = sparse.dense()
    assert dense.square().mean().item() == pytest.approx(1 / 16, rel=0.1)
    assert (dense != 0).double().mean().item() == pytest.approx(1 / math.sqrt(rows), rel=0.1)
    # every drawn entry is +-sqrt(s / d); a position drawn twice in a column adds up (rare)
    assert torch.allclose(sparse.values.abs(), torch.tensor(math.sqrt(math.sqrt(rows) / 16), dtype=torch.float64))


@pytest.mark.parametrize("kind", [FastfoodProjection, SparseProjection])
def test_a_seed_fixes_the_projection_bit_for_bit(kind):
    z = torch.randn(7)
    first, again, other = kind(300, 7, seed=11), kind(300, 7, seed=11), kind(300, 7, seed=12)
    assert torch.equal(first(z), again(z)) and not torch.equal(first(z), other(z))
    assert not list(first.state_dict())  # nothing to save: the seed regenerates it


# ----- SAID ------------------------------------------------------------------------------------


def randomise(model: nn.Module, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("projection", ["fastfood", "sparse"])
def test_said_update_is_lambda_times_the_projected_shared_vector(projection, batch):
    base = make_llama()
    model = adapt(make_llama(), "said", rank=24, projection=projection)
    layers = adapter_layers(model)
    assert len({id(layer.said_theta) for layer in layers.values()}) == 1  # one theta for the whole model
    assert trainable_parameters(model) == 24 + len(layers)
    randomise(model, scale=0.05)
    theta = next(iter(layers.values())).said_theta.detach()
    for name, layer in layers.items():
        dense = layer.projection.dense()
        expected = layer.said_lambda.detach() * (dense @ theta).view(layer.out_features, layer.in_features)
        torch.testing.assert_close(layer.delta_weight().detach(), expected, atol=1e-6, rtol=0)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ (base.get_submodule(name).weight + expected).T,
                                       atol=ATOL, rtol=0)


def test_did_has_no_layer_scalars():
    model = adapt(make_llama(), "said", rank=8, layer_scalars=False)
    assert trainable_parameters(model) == 8
    assert all(not hasattr(layer, "said_lambda") for layer in adapter_layers(model).values())


def test_said_theta_gradient_is_the_projected_full_fine_tuning_gradient(batch):
    model = adapt(make_llama(), "said", rank=16)
    layers = adapter_layers(model)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            layer.said_lambda.fill_(0.5 + 0.1 * i)
    full = make_llama()  # theta = 0: the adapted model is the base model, so their gradients agree
    model(**batch).loss.backward()
    full(**batch).loss.backward()
    theta = next(iter(layers.values())).said_theta
    expected = sum(layer.said_lambda.detach() * layer.projection.dense().T @ full.get_submodule(name).weight.grad.flatten()
                   for name, layer in layers.items())
    torch.testing.assert_close(theta.grad, expected, atol=1e-6, rtol=1e-4)


def test_said_file_holds_theta_once_the_scalars_and_the_seed_and_reloads_bit_identically(tmp_path, batch):
    model = adapt(make_llama(), "said", rank=32, seed=5)
    randomise(model, scale=0.05)
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / "rankwise_adapter.safetensors")
    layers = adapter_layers(model)
    assert sum(t.numel() for t in stored.values()) == 32 + len(layers)
    assert sorted({key.rsplit(".", 1)[1] for key in stored}) == ["said_lambda", "said_theta"]
    config = json.loads((tmp_path / "rankwise_adapter.json").read_text())
    assert all(entry["options"]["seed"] == 5 for entry in config["modules"].values())
    assert len(config["tied"]) == len(layers) - 1
    loaded = load_adapter(make_llama(), tmp_path)
    for name, layer in adapter_layers(loaded).items():
        assert torch.equal(layer.delta_weight(), layers[name].delta_weight())
    assert len({id(layer.said_theta) for layer in adapter_layers(loaded).values()}) == 1
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_said_layers_draw_independent_projections():
    layers = list(adapter_layers(adapt(make_llama(), "said", rank=8)).values())
    q, k = layers[0].projection.dense(), layers[1].projection.dense()
    assert q.shape == k.shape and not torch.equal(q, k)
