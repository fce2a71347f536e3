"""Several named adapters on one model: adding, switching, switching off, deleting, saving and
loading by name, and weighted combinations of LoRA adapters (PEFT's add_weighted_adapter as
the oracle)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_batch, make_llama
from rankwise.adapters import (
    AdapterSet,
    active_adapter,
    adapt,
    add_weighted_adapter,
    adapter_layers,
    adapter_names,
    delete_adapter,
    disable_adapter,
    export_peft,
    import_peft,
    load_adapter,
    merge,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from rankwise.errors import RankwiseError

RANK, ATOL = 4, 1e-5


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def perturb(model, seed):
    """Move the active adapter's trainable tensors off their init (a trained adapter, in one line)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()}, {k: type(m) for k, m in model.named_modules()},
            active_adapter(model))


def assert_untouched(model, before):
    state, flags, types, active = snapshot(model)
    assert types == before[2] and flags == before[1] and active == before[3]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], v) for k, v in before[0].items())


def two_adapters(second="lora", first="lora", **second_options):
    """'a' (``first``) on q/v, then 'b' (``second``) on v/down, each perturbed; returns model and each alone."""
    model = perturb(adapt(make_llama(), first, rank=RANK, alpha=8, targets=["q_proj", "v_proj"]), 1)
    only_a = logits(model, make_batch())
    perturb(adapt(model, second, rank=RANK, alpha=8, targets=["v_proj", "down_proj"], adapter_name="b",
                  **second_options), 2)
    return model, only_a


def test_a_second_name_adds_an_adapter_beside_the_first(batch):
    model, only_a = two_adapters()
    assert adapter_names(model) == ["default", "b"] and active_adapter(model) == "b"
    assert isinstance(model.get_submodule("model.layers.0.self_attn.v_proj"), AdapterSet)  # both on v_proj
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n or "down_proj" in n for n in trainable)
    assert trainable_parameters(model) == sum(l.lora_A.numel() + l.lora_B.numel()
                                              for l in adapter_layers(model, "b").values())
    with_b = logits(model, batch)
    set_adapter(model, "default")
    torch.testing.assert_close(logits(model, batch), only_a, atol=ATOL, rtol=0)
    set_adapter(model, "b")
    torch.testing.assert_close(logits(model, batch), with_b, atol=ATOL, rtol=0)
    # "b" alone on a fresh base gives the same outputs: the adapters do not leak into each other
    fresh = adapt(make_llama(), "lora", rank=RANK, alpha=8, targets=["v_proj", "down_proj"])
    with torch.no_grad():
        for name, layer in adapter_layers(fresh).items():
            layer.lora_A.copy_(adapter_layers(model, "b")[name].lora_A)
            layer.lora_B.copy_(adapter_layers(model, "b")[name].lora_B)
    torch.testing.assert_close(with_b, logits(fresh, batch), atol=ATOL, rtol=0)


@pytest.mark.parametrize("second", ["lora", "pissa", "olora", "loldu"])
def test_disable_adapter_gives_the_base_outputs_even_after_base_rewrites(second, batch):
    reference = logits(make_llama(), batch)
    model, only_a = two_adapters(second=second, first="pissa")
    with disable_adapter(model):
        torch.testing.assert_close(logits(model, batch), reference, atol=ATOL, rtol=0)
    assert active_adapter(model) == "b"
    # the rewriting adapter switched off restores the original weight for the other one
    set_adapter(model, "default")
    torch.testing.assert_close(logits(model, batch), only_a, atol=ATOL, rtol=0)


def test_the_second_adapter_is_initialised_on_the_original_weight(batch):
    """PiSSA added after another PiSSA on the same layer decomposes W, not the first one's residual."""
    model, _ = two_adapters(second="pissa", first="pissa")
    fresh = perturb(adapt(make_llama(), "pissa", rank=RANK, alpha=8, targets=["v_proj", "down_proj"]), 2)
    for name, layer in adapter_layers(fresh).items():
        torch.testing.assert_close(adapter_layers(model, "b")[name].A0, layer.A0, atol=1e-5, rtol=0)
        torch.testing.assert_close(adapter_layers(model, "b")[name].original_weight(),
                                   make_llama().get_submodule(name).weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, batch), logits(fresh, batch), atol=ATOL, rtol=0)


def test_delete_adapter_restores_the_rest(batch):
    reference = logits(make_llama(), batch)
    model, only_a = two_adapters(second="pissa")
    delete_adapter(model, "b")
    assert adapter_names(model) == ["default"] and active_adapter(model) == "default"
    assert not any(isinstance(m, AdapterSet) for m in model.modules())
    torch.testing.assert_close(logits(model, batch), only_a, atol=ATOL, rtol=0)
    delete_adapter(model, "default")
    assert not adapter_names(model) and all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model, batch), reference, atol=ATOL, rtol=0)
    assert set(model.state_dict()) == set(make_llama().state_dict())


def test_unload_merges_the_active_adapter_and_drops_the_others(batch):
    model, _ = two_adapters(second="pissa", first="pissa")
    expected = logits(model, batch)
    plain = unload(model)
    assert not adapter_names(plain) and set(plain.state_dict()) == set(make_llama().state_dict())
    torch.testing.assert_close(logits(plain, batch), expected, atol=ATOL, rtol=0)


def test_save_and_load_by_name(tmp_path, batch):
    model, only_a = two_adapters()
    with_b = logits(model, batch)
    save_adapter(model, tmp_path / "a", adapter_name="default")
    save_adapter(model, tmp_path / "b")  # the active one
    assert json.loads((tmp_path / "b" / "rankwise_adapter.json").read_text())["adapter_name"] == "b"
    loaded = load_adapter(make_llama(), tmp_path / "a")
    load_adapter(loaded, tmp_path / "b", adapter_name="other")
    assert adapter_names(loaded) == ["default", "other"] and active_adapter(loaded) == "other"
    torch.testing.assert_close(logits(loaded, batch), with_b, atol=ATOL, rtol=0)
    set_adapter(loaded, "default")
    torch.testing.assert_close(logits(loaded, batch), only_a, atol=ATOL, rtol=0)
    # PEFT files load by name too
    export_peft(model, tmp_path / "peft-b", adapter_name="b")
    import_peft(loaded, tmp_path / "peft-b", adapter_name="peft")
    torch.testing.assert_close(logits(loaded, batch), with_b, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda m: adapt(m, "lora", rank=2, adapter_name="b"), "already holds an adapter named 'b'"),
        (lambda m: set_adapter(m, "c"), "no adapter named 'c'; its adapters: default, b"),
        (lambda m: delete_adapter(m, "c"), "no adapter named 'c'"),
        (lambda m: save_adapter(m, "/nonexistent/never", adapter_name="c"), "no adapter named 'c'"),
        (lambda m: adapt(m, "lora", adapter_name="a.b"), "adapter_name must be a non-empty string without '.'"),
        (lambda m: adapt(m, "lora", adapter_name=""), "adapter_name must be"),
        (lambda m: add_weighted_adapter(m, ["default", "c"], [1, 1], "w"), "no adapter named 'c'"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1], "w"), "one weight per adapter"),
        (lambda m: add_weighted_adapter(m, ["default"], [1], "b"), "already holds an adapter named 'b'"),
        (lambda m: add_weighted_adapter(m, ["default", "b"], [1, 1], "w", combination_type="ties"),
         "'ties' is not one of svd, linear, cat"),
    ],
)
def test_bad_names_are_refused_and_leave_the_model(action, message):
    model, _ = two_adapters()
    before = snapshot(model)
    with pytest.raises(RankwiseError) as info:
        action(model)
    assert message in str(info.value)
    assert_untouched(model, before)


def test_switching_disabling_or_deleting_a_merged_adapter_is_refused():
    model, _ = two_adapters()
    merge(model)
    before = snapshot(model)
    for action in (lambda: set_adapter(model, "default"), lambda: delete_adapter(model, "b"),
                   lambda: adapt(model, "lora", adapter_name="c"), lambda: disable_adapter(model).__enter__()):
        with pytest.raises(RankwiseError, match="merged"):
            action()
        assert_untouched(model, before)
    unmerge(model)
    set_adapter(model, "default")


def test_weighted_combination_of_rewriting_adapters_is_refused():
    model, _ = two_adapters(second="pissa")
    before = snapshot(model)
    with pytest.raises(RankwiseError, match=r"adapter 'b' \(pissa\).*not a plain LoRA pair"):
        add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "w", combination_type="cat")
    assert_untouched(model, before)


# ----- weighted combinations: PEFT as the oracle -------------------------------------------------


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_adapters_match_peft(combination, batch):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    ranks = (RANK, RANK) if combination == "linear" else (RANK, 2)
    weights = [0.7, -0.4]
    peft_model = peft.get_peft_model(make_llama(), peft.LoraConfig(r=ranks[0], lora_alpha=8, target_modules=targets))
    peft_model.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=3, target_modules=targets[:2], use_rslora=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    peft_model.add_weighted_adapter(["default", "b"], weights, "w", combination_type=combination, svd_rank=3)
    peft_model.set_adapter("w")
    peft_model.eval()

    mine = adapt(make_llama(), "lora", rank=ranks[0], alpha=8, targets=targets)
    adapt(mine, "lora", rank=ranks[1], alpha=3, rslora=True, targets=targets[:2], adapter_name="b")
    prefix = "base_model.model."
    source = dict(peft_model.named_parameters())
    with torch.no_grad():
        for adapter in ("default", "b"):
            for name, layer in adapter_layers(mine, adapter).items():
                layer.lora_A.copy_(source[f"{prefix}{name}.lora_A.{adapter}.weight"])
                layer.lora_B.copy_(source[f"{prefix}{name}.lora_B.{adapter}.weight"])
    add_weighted_adapter(mine, ["default", "b"], weights, "w", combination_type=combination, svd_rank=3)
    assert active_adapter(mine) == "w"
    for name, layer in adapter_layers(mine, "w").items():
        peft_layer = peft_model.get_submodule(prefix + name)
        torch.testing.assert_close(layer.delta_weight().detach(), peft_layer.get_delta_weight("w"), atol=1e-5,
                                   rtol=1e-4)
    torch.testing.assert_close(logits(mine, batch), logits(peft_model, batch), atol=ATOL, rtol=0)


def test_cat_is_the_exact_weighted_sum_of_the_updates():
    model, _ = two_adapters()
    deltas = {n: 0.5 * l.delta_weight().detach() for n, l in adapter_layers(model, "default").items()}
    for n, l in adapter_layers(model, "b").items():
        deltas[n] = deltas.get(n, 0) + 2.0 * l.delta_weight().detach()
    add_weighted_adapter(model, ["default", "b"], [0.5, 2.0], "sum", combination_type="cat")
    for name, layer in adapter_layers(model, "sum").items():
        torch.testing.assert_close(layer.delta_weight().detach(), deltas[name], atol=1e-6, rtol=1e-5)
