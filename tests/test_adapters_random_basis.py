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
    stored = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
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
    stored = load_file(tmp_path / "adapter_model.safetensors")
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
