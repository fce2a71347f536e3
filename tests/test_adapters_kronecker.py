"""LoKr (and the Kronecker family): the split of a dimension, the Kronecker update on constructed
factors and its rank, the forward that never forms it, PEFT's LoKr as the oracle (identical
outputs for PEFT's full and low-rank factor shapes) and the export loading in PEFT."""

from __future__ import annotations

import pytest
import torch

from conftest import make_batch, make_llama
from rankwise.adapters import adapt, adapter_layers, export_peft
from rankwise.adapters.kronecker_family import factorization, kron_apply

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]


def perturbed(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name in layer.factor_names():
                factor = getattr(layer, name)
                factor.copy_(0.3 * torch.randn(factor.shape, generator=generator, dtype=factor.dtype))
    return model


def test_factorization_is_lycoris_split():
    # the examples of PEFT's LoKr docstring
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(12) == (3, 4) and factorization(12, 5) == (3, 4)


def test_kron_apply_is_the_kronecker_product_without_forming_it():
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(3, 4, generator=generator), torch.randn(5, 2, generator=generator)
    x = torch.randn(2, 7, 8, generator=generator)
    torch.testing.assert_close(kron_apply(x, left, right), x @ torch.kron(left, right).T, atol=1e-5, rtol=0)


def test_update_is_the_scaled_kronecker_product_and_its_rank_multiplies():
    model = perturbed(adapt(make_llama(), "lokr", rank=2, alpha=6, targets=["q_proj"]))
    for layer in adapter_layers(model).values():
        assert layer.decompose_w2 and not layer.decompose_w1  # 32 = 4 x 8; r = 2 < 8 / 2
        w1 = layer.lokr_w1.detach()
        w2 = (layer.lokr_w2_a @ layer.lokr_w2_b).detach()
        delta = layer.delta_weight().detach()
        for (i, k, j, l) in [(0, 0, 0, 0), (3, 7, 2, 5), (1, 4, 3, 0)]:
            assert delta[i * 8 + k, j * 8 + l].item() == pytest.approx(3.0 * (w1[i, j] * w2[k, l]).item(), abs=1e-6)
        assert torch.linalg.matrix_rank(delta) == 4 * 2  # rank(W1) rank(W2)


@pytest.mark.parametrize("config", [{"r": 4}, {"r": 2}, {"r": 2, "decompose_both": True, "decompose_factor": 16}],
                         ids=["full-w2", "low-rank-w2", "decompose-both"])
def test_outputs_equal_peft_lokr_and_the_export_loads_in_peft(config, tmp_path):
    peft = pytest.importorskip("peft")
    options = {k: v for k, v in config.items() if k != "r"}
    ours = perturbed(adapt(make_llama(), "lokr", rank=config["r"], alpha=8, targets=TARGETS, **options))
    theirs = peft.get_peft_model(make_llama(), peft.LoKrConfig(alpha=8, target_modules=TARGETS, **config)).eval()
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            module = theirs.get_submodule(f"base_model.model.{name}")
            for factor in layer.factor_names():
                getattr(module, factor)["default"].copy_(getattr(layer, factor))
    batch = make_batch()
    with torch.no_grad():
        expected = theirs(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, atol=ATOL, rtol=0)
    report = export_peft(ours, tmp_path)
    assert report["peft_type"] == "LOKR" and report["exact"]
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=ATOL, rtol=0)


# ----- Compacter -------------------------------------------------------------------------------


def compacter_model(seed=0, **options):
    from rankwise.adapters import adapt as adapt_model

    model = adapt_model(make_llama(), "compacter", rank=8, alpha=16, targets=["q_proj", "down_proj"], **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.up_left.copy_(0.5 * torch.randn(layer.up_left.shape, generator=generator))
    return model


def test_compacter_lphm_is_the_sum_of_kronecker_products_and_applies_without_forming_it():
    from rankwise.adapters.compacter import lphm, lphm_apply

    generator = torch.Generator().manual_seed(0)
    slow, left, right = (torch.randn(*shape, generator=generator) for shape in ((2, 2, 2), (2, 3), (2, 5)))
    expected = sum(torch.kron(slow[i], torch.outer(left[i], right[i])) for i in range(2))
    torch.testing.assert_close(lphm(slow, left, right), expected, atol=1e-6, rtol=0)
    x = torch.randn(4, 10, generator=generator)
    torch.testing.assert_close(lphm_apply(x, slow, left, right), x @ expected.T, atol=1e-5, rtol=0)


def test_compacter_update_is_up_times_down_with_slow_weights_shared_by_all_layers(tmp_path):
    from rankwise.adapters import load_adapter, save_adapter, trainable_parameters
    from safetensors.torch import load_file

    model = compacter_model()
    layers = list(adapter_layers(model).values())
    assert len({id(layer.phm_rule) for layer in layers}) == 1 and layers[0].phm_rule.requires_grad
    for layer in layers:
        up, down = layer.projections()
        assert up.shape == (layer.out_features, 8) and down.shape == (8, layer.in_features)
        torch.testing.assert_close(layer.delta_weight(), 2.0 * up @ down, atol=1e-6, rtol=0)
        assert torch.linalg.matrix_rank(layer.delta_weight().detach()) <= 8
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer.adapter_forward(x), x @ layer.delta_weight().detach().T, atol=1e-5, rtol=0)
    # n^3 slow weights once + (out + in + 2r) fast weights per layer: q_proj 32 x 32, down_proj 32 x 64
    assert trainable_parameters(model) == 64 + 2 * (32 + 32 + 16) + 2 * (32 + 64 + 16)
    save_adapter(model, tmp_path)
    assert sum(key.endswith("phm_rule") for key in load_file(tmp_path / "rankwise_adapter.safetensors")) == 1
    loaded = load_adapter(make_llama(), tmp_path)
    assert len({id(layer.phm_rule) for layer in adapter_layers(loaded).values()}) == 1
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)


def test_compacter_needs_n_to_divide_the_dimensions_and_the_rank():
    from rankwise.errors import RankwiseError

    with pytest.raises(RankwiseError, match="phm_dim n=3 must divide"):
        adapt(make_llama(), "compacter", rank=6, targets=["q_proj"], phm_dim=3)
