"""Random-basis and shared adapters (VeRA, RandLoRA, Uni-LoRA, NOLA, ...): the seeded frozen
tensors, the papers' formulas on constructed inputs and PEFT as the oracle where it has the method.

The family contract (rankwise.adapters.random_basis_family), checked for every registered
method of the family: the saved file holds exactly the trainable parameters (no frozen random
tensor), the frozen tensors depend on the ``seed`` option alone (not on the global RNG), and a
reload onto a fresh base gives bit-identical outputs on the CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_batch, make_gpt2, make_llama
from rankwise.adapters import ADAPTERS, adapt, adapter_layers, export_peft, load_adapter, save_adapter, trainable_parameters
from rankwise.adapters.random_basis_family import kaiming_uniform, seeded_generator

RANK = 4
ATOL = 1e-5
FAMILY = ADAPTERS.names(family="random_basis")


def logits(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits


def perturb(model, seed=0, scale=0.05):
    """Move every trainable tensor off its init so the update is non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator).to(p))
    return model


def frozen_tensors(model) -> dict[str, torch.Tensor]:
    """Every adapter buffer (the frozen random tensors), keyed by module path."""
    return {f"{name}.{key}": buffer for name, layer in adapter_layers(model).items()
            for key, buffer in layer.named_buffers() if not key.startswith("base.")}


# ----- the family contract --------------------------------------------------------------------


def test_the_family_has_its_methods():
    assert "vera" in FAMILY


@pytest.mark.parametrize("method", FAMILY)
def test_saved_file_holds_the_trainable_parameters_not_the_random_tensors(method, batch, tmp_path):
    model = perturb(adapt(make_llama(), method, rank=RANK, alpha=2 * RANK))
    expected = logits(model, batch)
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / "rankwise_adapter.safetensors")
    config = json.loads((tmp_path / "rankwise_adapter.json").read_text())
    frozen = frozen_tensors(model)
    assert frozen, "a random-basis method has frozen random tensors"
    # every stored number is a trainable one (a shared parameter is stored once): no frozen tensor on disk
    assert sum(t.numel() for t in stored.values()) == trainable_parameters(model)
    assert not set(stored) & set(frozen) and not set(config["tied"]) & set(frozen)
    trainable = {f"{n}.{k}" for n, layer in adapter_layers(model).items() for k, p in layer.named_parameters()
                 if p.requires_grad}
    assert set(stored) | set(config["tied"]) == trainable
    loaded = load_adapter(make_llama(), tmp_path)
    assert torch.equal(logits(loaded, batch), expected)  # bit-identical on the CPU
    for key, tensor in frozen_tensors(loaded).items():
        assert torch.equal(tensor, frozen[key]), key


@pytest.mark.parametrize("method", FAMILY)
def test_frozen_tensors_come_from_the_seed_alone(method):
    torch.manual_seed(1)
    first = frozen_tensors(adapt(make_llama(), method, rank=RANK))
    torch.manual_seed(2)
    second = frozen_tensors(adapt(make_llama(), method, rank=RANK))
    other_seed = frozen_tensors(adapt(make_llama(), method, rank=RANK, seed=1))
    assert first.keys() == second.keys() == other_seed.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert any(not torch.equal(first[key], other_seed[key]) for key in first)


def test_seeded_draws_are_stable_and_labelled():
    a = kaiming_uniform((3, 50), seeded_generator(5))
    assert torch.equal(a, kaiming_uniform((3, 50), seeded_generator(5)))
    assert a.abs().max() <= (6 / 50) ** 0.5
    per_layer = kaiming_uniform((3, 50), seeded_generator(5, "model.layers.0.q_proj"))
    assert torch.equal(per_layer, kaiming_uniform((3, 50), seeded_generator(5, "model.layers.0.q_proj")))
    assert not torch.equal(per_layer, a)
    assert not torch.equal(per_layer, kaiming_uniform((3, 50), seeded_generator(5, "model.layers.1.q_proj")))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method", FAMILY)
def test_other_dtypes_keep_the_draws_up_to_rounding(method, dtype):
    reference = frozen_tensors(adapt(make_llama(), method, rank=RANK))
    model = adapt(make_llama().to(dtype), method, rank=RANK)
    for key, tensor in frozen_tensors(model).items():
        assert tensor.dtype == (reference[key].dtype if not reference[key].is_floating_point() else dtype)
        assert torch.equal(tensor, reference[key].to(tensor.dtype)), key
    perturb(model)
    model.train()
    model(**make_batch()).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters() if p.requires_grad)


# ----- VeRA ----------------------------------------------------------------------------------


def test_vera_update_is_the_papers_formula():
    model = perturb(adapt(make_llama(), "vera", rank=RANK, alpha=3.0, targets=["q_proj", "down_proj"]))
    for layer in adapter_layers(model).values():
        b, d = layer.lambda_b.detach(), layer.lambda_d.detach()
        A, B = layer.vera_A[:, : layer.in_features], layer.vera_B[: layer.out_features]
        expected = (3.0 / RANK) * torch.diag(b) @ B @ torch.diag(d) @ A
        torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-6, rtol=1e-5)
        x = torch.randn(5, layer.in_features)
        torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T, atol=1e-6, rtol=1e-5)
    # one A and one B for the whole model, sliced to each layer (q_proj 32 x 32, down_proj 32 x 64)
    layers = list(adapter_layers(model).values())
    assert layers[0].vera_A.shape == (RANK, 64) and layers[0].vera_B.shape == (32, RANK)
    assert all(layer.vera_A is layers[0].vera_A for layer in layers)


def test_vera_init_is_b_zero_d_initial():
    model = adapt(make_llama(), "vera", rank=RANK, d_initial=0.3)
    for layer in adapter_layers(model).values():
        assert torch.equal(layer.lambda_b, torch.zeros_like(layer.lambda_b))
        assert torch.equal(layer.lambda_d, torch.full_like(layer.lambda_d, 0.3))


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_vera_matches_peft_vera_and_exports_to_it(make, batch, tmp_path):
    peft = pytest.importorskip("peft")
    model = perturb(adapt(make(), "vera", rank=RANK, alpha=2 * RANK, seed=3))
    reference = peft.get_peft_model(make(), peft.VeraConfig(r=RANK, target_modules="all-linear" if make is make_llama
                                                            else ["c_attn", "c_proj", "c_fc"],
                                                            projection_prng_key=3, fan_in_fan_out=make is make_gpt2))
    layers = adapter_layers(model)
    assert sorted(layers) == sorted(n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                                    if hasattr(m, "vera_lambda_b"))
    # the same seed draws the same frozen matrices as PEFT's projection_prng_key
    first = next(iter(layers.values()))
    assert torch.equal(first.vera_A, reference.base_model.vera_A["default"])
    assert torch.equal(first.vera_B, reference.base_model.vera_B["default"])
    with torch.no_grad():  # PEFT has no alpha: our s = alpha / r goes into its lambda_b
        for name, layer in layers.items():
            module = reference.get_submodule(f"base_model.model.{name}")
            module.vera_lambda_b["default"].copy_(layer.scaling * layer.lambda_b)
            module.vera_lambda_d["default"].copy_(layer.lambda_d)
    expected = logits(model, batch)
    torch.testing.assert_close(logits(reference, batch), expected, atol=ATOL, rtol=0)

    report = export_peft(model, tmp_path)
    assert report["peft_type"] == "VERA" and report["exact"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["projection_prng_key"] == 3 and config["r"] == RANK
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)
    # the exported file is PEFT's own layout: per-layer lambdas plus the shared projections once
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(stored)
    assert len(stored) == 2 + 2 * len(layers)


def test_vera_adapter_file_is_out_plus_r_numbers_per_layer(tmp_path):
    model = adapt(make_llama(), "vera", rank=RANK)
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / "rankwise_adapter.safetensors")
    assert sum(t.numel() for t in stored.values()) == sum(layer.out_features + RANK
                                                          for layer in adapter_layers(model).values())


# ----- RandLoRA --------------------------------------------------------------------------------


def test_randlora_update_is_the_papers_sum_of_scaled_bases():
    model = perturb(adapt(make_llama(), "randlora", rank=RANK, alpha=3.0, targets=["q_proj", "up_proj", "down_proj"]),
                    scale=0.5)
    for layer in adapter_layers(model).values():
        m, big = min(layer.out_features, layer.in_features), max(layer.out_features, layer.in_features)
        bases = -(-m // RANK)
        A = layer.randlora_A[:RANK, 0, :m]
        flat_b = layer.randlora_B[:big, :bases, :RANK].reshape(big, -1)
        expected = sum(flat_b[:, i::bases] @ torch.diag(layer.lambdas[:, i]) @ A @ torch.diag(layer.gammas[i])
                       for i in range(bases))
        expected = (3.0 / RANK) * (expected if layer.in_features == m else expected.T)
        torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-5, rtol=1e-5)
        x = torch.randn(5, layer.in_features)
        torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 32)])
def test_randlora_update_is_full_rank_from_O_n_trainable_scalars(shape):
    out_features, in_features = shape
    m = min(shape)
    rank = m // 2  # two bases: 2 (r + m) = 3 m trainable scalars, against m * max(shape) for the dense update
    model = perturb(adapt(torch.nn.Sequential(torch.nn.Linear(in_features, out_features)), "randlora", rank=rank),
                    scale=1.0)
    layer = adapter_layers(model)["0"]
    assert trainable_parameters(model) == 3 * m
    assert torch.linalg.matrix_rank(layer.delta_weight()) == m  # full rank, though each term has rank r
    up, down = (factor.detach().double() for factor in layer.factors())
    assert torch.linalg.matrix_rank(up[:, 0::2] @ down[0::2]) == rank  # the first basis term alone
    lora = perturb(adapt(torch.nn.Sequential(torch.nn.Linear(in_features, out_features)), "lora", rank=rank), scale=1.0)
    assert torch.linalg.matrix_rank(adapter_layers(lora)["0"].delta_weight()) == rank
    assert trainable_parameters(lora) > trainable_parameters(model)


def test_randlora_matches_peft_randlora_with_copied_bases_and_exports_to_it(batch, tmp_path):
    peft = pytest.importorskip("peft")
    model = perturb(adapt(make_llama(), "randlora", rank=RANK, alpha=2 * RANK), scale=0.5)
    reference = peft.get_peft_model(make_llama(), peft.RandLoraConfig(r=RANK, randlora_alpha=2 * RANK,
                                                                      target_modules="all-linear"))
    layers = adapter_layers(model)
    first = next(iter(layers.values()))
    with torch.no_grad():
        # PEFT draws its bases in bf16 and normalises them: copy ours in (the oracle checks the update's form)
        assert reference.base_model.randlora_A["default"].shape == first.randlora_A.shape
        assert reference.base_model.randlora_B["default"].shape == first.randlora_B.shape
        reference.base_model.randlora_A["default"].copy_(first.randlora_A)
        reference.base_model.randlora_B["default"].copy_(first.randlora_B)
        for name, layer in layers.items():
            module = reference.get_submodule(f"base_model.model.{name}")
            module.randlora_lambda["default"].copy_(layer.lambdas)
            module.randlora_gamma["default"].copy_(layer.gammas)
    expected = logits(model, batch)
    assert not torch.allclose(expected, logits(make_llama(), batch), atol=1e-3)
    torch.testing.assert_close(logits(reference, batch), expected, atol=ATOL, rtol=0)
    report = export_peft(model, tmp_path)
    assert report["peft_type"] == "RANDLORA" and report["exact"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["randlora_alpha"] == 2 * RANK
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)


def test_randlora_init_is_lambda_zero_gamma_one_over_m():
    model = adapt(make_llama(), "randlora", rank=RANK)
    for layer in adapter_layers(model).values():
        assert torch.equal(layer.lambdas, torch.zeros_like(layer.lambdas))
        m = min(layer.out_features, layer.in_features)
        assert torch.equal(layer.gammas, torch.full_like(layer.gammas, 1.0 / m))


# ----- Uni-LoRA --------------------------------------------------------------------------------


def unilora_projection(model) -> torch.Tensor:
    """The dense ``D x d`` matrix ``P`` (layers in name order, A then B) built from the layers' buffers."""
    layers = adapter_layers(model)
    length = next(iter(layers.values())).theta_d.numel()
    rows = []
    for name in sorted(layers):
        layer = layers[name]
        for index, scale in ((layer.index_A, layer.scale_A), (layer.index_B, layer.scale_B)):
            block = torch.zeros(index.numel(), length)
            block[torch.arange(index.numel()), index.flatten()] = scale.flatten()
            rows.append(block)
    return torch.cat(rows)


@pytest.mark.parametrize("length", [256, 1000, 5000])
def test_unilora_projection_is_an_isometry_onto_all_lora_factors(length):
    model = adapt(make_llama(), "unilora", rank=RANK, theta_d_length=length)
    layers = adapter_layers(model)
    projection = unilora_projection(model)
    total = sum(RANK * (layer.in_features + layer.out_features) for layer in layers.values())
    assert projection.shape == (total, length)
    assert ((projection != 0).sum(dim=1) == 1).all()  # one non-zero per row
    used = min(total, length)  # with d > D some columns stay unused (zero), the rest are orthonormal
    gram = projection.T @ projection
    torch.testing.assert_close(gram.diagonal().sort(descending=True).values[:used], torch.ones(used))
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram))
    counts = (projection != 0).sum(dim=0)
    assert counts.max() - counts.min() <= 1  # balanced: every column floor(D / d) or ceil(D / d) rows
    # the one vector is every layer's A and B: theta_D = P theta_d, in name order
    theta = next(iter(layers.values())).theta_d.detach()
    flat = torch.cat([t.flatten() for name in sorted(layers)
                      for t in reversed(layers[name].factors())]).detach()
    torch.testing.assert_close(flat, projection @ theta)


def test_unilora_trains_one_global_vector(batch):
    model = adapt(make_llama(), "unilora", rank=RANK, theta_d_length=300)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].shape == (300,)
    assert len({id(layer.theta_d) for layer in adapter_layers(model).values()}) == 1
    model.train()
    model(**batch).loss.backward()
    assert trainable[0].grad is not None and trainable[0].grad.abs().sum() > 0
    bound_model = adapt(make_llama(), "unilora", rank=RANK, init_bound=0.5)
    theta = next(iter(adapter_layers(bound_model).values())).theta_d
    assert theta.abs().max() <= 0.5 and theta.abs().max() > 0.25


def test_unilora_index_map_does_not_depend_on_the_layer_order(tmp_path):
    """make_shared sees the layers in model order at adapt and in saved-config (sorted) order at load."""
    from rankwise.adapters.unilora import UniLoraLayer

    model = make_llama()
    bases = {n: model.get_submodule(n) for n in ["model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"]}
    options = UniLoraLayer.resolve_options({}, owner="test")
    forward = UniLoraLayer.make_shared(bases, RANK, options)
    backward = UniLoraLayer.make_shared(dict(reversed(list(bases.items()))), RANK, options)
    for key in forward:
        if key != "theta_d":
            assert torch.equal(forward[key], backward[key]), key


def test_unilora_exports_to_peft_unilora_with_identical_outputs(batch, tmp_path):
    peft = pytest.importorskip("peft")
    model = perturb(adapt(make_llama(), "unilora", rank=RANK, alpha=2 * RANK, theta_d_length=200), scale=0.3)
    expected = logits(model, batch)
    report = export_peft(model, tmp_path)
    assert report["peft_type"] == "UNILORA" and report["exact"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["theta_d_length"] == 200 and config["save_indices"] is True
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)
    # PEFT's one vector is ours (the scaling s = alpha / r went into its scales of B)
    theta = next(iter(adapter_layers(model).values())).theta_d
    assert torch.equal(loaded.base_model.unilora_theta_d["default"].detach(), theta.detach())


# ----- NOLA ------------------------------------------------------------------------------------


def test_nola_update_is_the_papers_mixture_of_bases():
    model = perturb(adapt(make_llama(), "nola", rank=RANK, alpha=3.0, num_basis_A=5, num_basis_B=7,
                          targets=["q_proj", "down_proj"]), scale=0.5)
    for layer in adapter_layers(model).values():
        A = layer.A_0 + sum(layer.coefficients_A[i] * layer.bases_A[i] for i in range(5))
        B = sum(layer.coefficients_B[j] * layer.bases_B[j] for j in range(7))
        expected = (3.0 / RANK) * B @ A
        torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-6, rtol=1e-5)
        x = torch.randn(5, layer.in_features)
        torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T, atol=1e-6, rtol=1e-5)
        assert layer.bases_A.shape == (5, RANK, layer.in_features)
        assert layer.bases_B.shape == (7, layer.out_features, RANK)
        assert layer.bases_A.abs().max() <= 1 / 5 ** 0.5 and layer.bases_B.abs().max() <= 1 / 7 ** 0.5
    first, second = list(adapter_layers(model).values())[:2]
    assert not torch.equal(first.bases_A[:, :, :32], second.bases_A[:, :, :32])  # each layer has its own bases


def test_nola_starts_with_zero_coefficients_and_trains_from_B():
    model = adapt(make_llama(), "nola", rank=RANK, num_basis_A=8, num_basis_B=8)
    layers = adapter_layers(model).values()
    assert all(not layer.coefficients_A.any() and not layer.coefficients_B.any() for layer in layers)
    assert all(not layer.delta_weight().any() for layer in layers)
    model.train()
    model(**make_batch()).loss.backward()
    assert all(layer.coefficients_B.grad.abs().sum() > 0 for layer in layers)  # through the frozen A_0


# ----- MoS -------------------------------------------------------------------------------------


def test_mos_factors_are_concatenated_shards_of_the_pools_and_private_shards():
    model = perturb(adapt(make_llama(), "mos", rank=RANK, alpha=3.0, equivalent_rank=2, private_rank=1, shards=3),
                    scale=0.5)
    for layer in adapter_layers(model).values():
        up, down = layer.factors()
        for j in range(RANK):
            if j < 1:
                shards_a = [layer.private_A[j * 3 + t] for t in range(3)]
                shards_b = [layer.private_B[j * 3 + t] for t in range(3)]
            else:
                shards_a = [layer.pool_A[layer.index_A[(j - 1) * 3 + t]] for t in range(3)]
                shards_b = [layer.pool_B[layer.index_B[(j - 1) * 3 + t]] for t in range(3)]
            assert torch.equal(down[j], torch.cat(shards_a)[: layer.in_features])  # 32 or 64 cut from 3 x 11 / 3 x 22
            assert torch.equal(up[:, j], torch.cat(shards_b)[: layer.out_features])
        expected = (3.0 / RANK) * up @ down
        torch.testing.assert_close(layer.delta_weight(), expected)
        x = torch.randn(5, layer.in_features)
        torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T, atol=1e-6, rtol=1e-5)


def test_mos_update_has_rank_r_from_the_parameters_of_a_rank_r_e_lora():
    # the 8 attention projections share one pool of 8 (2 - 1) 2 = 16 shards: 14 public slots per layer fit without repeats
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    model = perturb(adapt(make_llama(), "mos", rank=8, equivalent_rank=2, private_rank=1, shards=2, targets=attention),
                    scale=0.5)
    lora = adapt(make_llama(), "lora", rank=2, targets=attention)
    assert trainable_parameters(model) == trainable_parameters(lora)  # 2 divides every dimension: r_e (in + out)
    for layer in adapter_layers(model).values():
        assert torch.linalg.matrix_rank(layer.delta_weight()) == 8


def test_mos_pools_are_shared_by_same_shaped_layers_and_sized_by_the_budget():
    model = adapt(make_llama(), "mos", rank=RANK, equivalent_rank=2, private_rank=1, shards=2)
    layers = adapter_layers(model)
    by_shape: dict = {}
    for layer in layers.values():
        by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
    assert len(by_shape) == 3  # q/k/v/o 32 x 32, gate/up 64 x 32, down 32 x 64
    for (out_features, in_features), group in by_shape.items():
        assert all(layer.pool_A is group[0].pool_A and layer.pool_B is group[0].pool_B for layer in group)
        assert group[0].pool_A.shape == (len(group) * (2 - 1) * 2, in_features // 2)
        assert group[0].pool_B.shape == (len(group) * (2 - 1) * 2, out_features // 2)
        assert len({id(layer.private_A) for layer in group}) == len(group)  # privatized shards: one set per layer
    assert len({id(g[0].pool_A) for g in by_shape.values()}) == 3


@pytest.mark.parametrize("subset_selection", [True, False])
@pytest.mark.parametrize("pair_dissociation", [True, False])
def test_mos_subset_selection_and_pair_dissociation(subset_selection, pair_dissociation):
    model = adapt(make_llama(), "mos", rank=RANK, equivalent_rank=2, private_rank=0, shards=2,
                  subset_selection=subset_selection, pair_dissociation=pair_dissociation)
    group = [layer for layer in adapter_layers(model).values() if layer.out_features == layer.in_features]
    assert len(group) == 8
    pool = group[0].pool_A.shape[0]
    for layer in group:
        assert torch.equal(layer.index_A, layer.index_B) != pair_dissociation
        # a random subset: no shard taken more often than ceil(slots / pool) within a layer
        assert torch.bincount(layer.index_A, minlength=pool).max() <= -(-RANK * 2 // pool)
    same_a = all(torch.equal(layer.index_A, group[0].index_A) for layer in group)
    same_b = all(torch.equal(layer.index_B, group[0].index_B) for layer in group)
    assert same_a == same_b == (not subset_selection)


def test_mos_whole_vectors_without_sharding():
    model = adapt(make_llama(), "mos", rank=RANK, equivalent_rank=2, private_rank=0, shards=1)
    layer = adapter_layers(model)["model.layers.0.mlp.up_proj"]
    assert layer.pool_A.shape[1] == layer.in_features and layer.pool_B.shape[1] == layer.out_features


@pytest.mark.parametrize("options, message", [
    ({"equivalent_rank": 5}, "equivalent_rank=5 exceeds rank=4"),
    ({"equivalent_rank": 2, "private_rank": 2}, "private_rank=2 leaves no public pool"),
    ({"equivalent_rank": 2, "private_rank": 3}, "private_rank=3 leaves no public pool"),
])
def test_mos_refuses_budgets_it_cannot_build_and_leaves_the_model(options, message):
    from rankwise.errors import RankwiseError

    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        adapt(model, "mos", rank=RANK, **options)
    assert not adapter_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_mos_with_every_vector_private_is_a_lora():
    model = adapt(make_llama(), "mos", rank=RANK, equivalent_rank=RANK, private_rank=RANK, shards=1)
    assert trainable_parameters(model) == trainable_parameters(adapt(make_llama(), "lora", rank=RANK))
    assert all(not hasattr(layer, "pool_A") for layer in adapter_layers(model).values())


# ----- the native PEFT exports on GPT-2's Conv1D layers (fan_in_fan_out) -------------------------


@pytest.mark.parametrize("method, options, peft_type", [
    ("vera", {}, "VERA"), ("randlora", {}, "RANDLORA"), ("unilora", {"theta_d_length": 300}, "UNILORA"),
])
def test_native_exports_load_in_peft_on_gpt2(method, options, peft_type, tmp_path):
    peft = pytest.importorskip("peft")
    batch = make_batch()
    model = perturb(adapt(make_gpt2(), method, rank=RANK, alpha=2 * RANK, **options), scale=0.3)
    expected = logits(model, batch)
    assert not torch.allclose(expected, logits(make_gpt2(), batch), atol=1e-3)
    report = export_peft(model, tmp_path)
    assert report["peft_type"] == peft_type
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(make_gpt2(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)
