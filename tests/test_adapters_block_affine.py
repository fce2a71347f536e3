"""Bone and MiSS: the paper's block formulas on constructed weights, the merge's inverse, PEFT's
MiSS as the oracle (identical outputs, and the export loads in ``PeftModel.from_pretrained``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_batch, make_llama
from rankwise.adapters import adapt, adapter_layers, export_peft, merge, unmerge
from rankwise.errors import RankwiseError

ATOL = 1e-5


class OneLayer(nn.Module):
    """A single bias-free ``out x in`` Linear named ``proj`` holding a given weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def only_layer(model):
    return next(iter(adapter_layers(model).values()))


def constructed(out=6, n_in=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=generator, dtype=dtype)


def fill(parameter, seed=1, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        parameter.copy_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


# ----- Bone ------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["col", "row"])
def test_bone_update_is_the_papers_block_formula(structure):
    r, weight = 2, constructed()
    model = adapt(OneLayer(weight.clone()), "bone", rank=r, targets=["proj"], structure=structure)
    layer = only_layer(model)
    fill(layer.bone)
    bones = layer.bone.detach()
    assert bones.shape == ((6 if structure == "col" else 4) // r, r, r)
    expected = torch.zeros_like(weight)
    for row in range(6):
        for col in range(4):
            a, i, b, j = row // r, row % r, col // r, col % r
            shared = bones[a] if structure == "col" else bones[b]
            # dW_ab[i, j] = sum_k W_ab[i, k] D[k, j] + D[i, j]
            expected[row, col] = sum(weight[a * r + i, b * r + k] * shared[k, j] for k in range(r)) + shared[i, j]
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), x @ (weight + expected).T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("structure", ["col", "row"])
def test_bone_unmerge_inverts_the_affine_merge_exactly(structure):
    weight = constructed(8, 12, dtype=torch.float64)
    model = adapt(OneLayer(weight.clone()), "bone", rank=4, targets=["proj"], structure=structure)
    layer = only_layer(model)
    fill(layer.bone, scale=0.5)
    update = layer.delta_weight().detach()
    merge(model)  # the framework merges in fp32: rounding of order 1e-7 on entries of order 1
    torch.testing.assert_close(model.proj.base.weight, weight + update, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), update, atol=1e-6, rtol=1e-6)  # read from the recovered W
    torch.testing.assert_close(layer.original_weight().double(), weight, atol=1e-6, rtol=0)
    unmerge(model)
    torch.testing.assert_close(model.proj.base.weight, weight, atol=1e-6, rtol=0)


def test_bone_unmerge_with_a_singular_block_is_refused_and_keeps_the_merge():
    model = adapt(OneLayer(constructed(4, 4)), "bone", rank=2, targets=["proj"])
    layer = only_layer(model)
    with torch.no_grad():
        layer.bone[1] = -torch.eye(2, dtype=torch.float64)  # I + D_1 = 0: W_1b is lost in the merge
    merge(model)
    merged = model.proj.base.weight.detach().clone()
    with pytest.raises(RankwiseError, match=r"I \+ D is singular.*block 1"):
        unmerge(model)
    assert layer.merged and torch.equal(model.proj.base.weight, merged)


def test_bone_block_size_must_divide_both_dimensions():
    model = OneLayer(constructed(6, 4))
    with pytest.raises(RankwiseError, match=r"block size r=4 must divide both dimensions.*\[1, 2\]"):
        adapt(model, "bone", rank=4, targets=["proj"])
    assert type(model.proj) is nn.Linear


def test_bone_row_forward_never_forms_the_update_and_matches_it():
    weight = constructed(8, 12, dtype=torch.float32)
    model = adapt(OneLayer(weight.clone()), "bone", rank=4, targets=["proj"], structure="row")
    layer = only_layer(model)
    fill(layer.bone)
    x = torch.randn(2, 3, 12)
    layer.delta_weight = None  # the row path must not call it
    torch.testing.assert_close(layer.adapter_forward(x), x @ type(layer).delta_weight(layer).T, atol=1e-5, rtol=0)


def test_bone_row_exports_as_the_best_rank_k_lora_with_its_error(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapt(make_llama(), "bone", rank=4, alpha=8, structure="row", targets=["q_proj"])
    for layer in adapter_layers(model).values():
        fill(layer.bone, scale=0.2)
    report = export_peft(model, tmp_path)
    assert not report["exact"] and report["max_relative_error"] > 1e-3
    assert {m["source"] for m in report["modules"].values()} == {"svd"}
    full = export_peft(model, tmp_path / "full", rank=32)
    assert full["exact"]
    batch = make_batch()
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "full")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)


# ----- MiSS, with PEFT's MiSS as the oracle ---------------------------------------------------

MISS_VARIANTS = [("miss", {}, True), ("mini", {"mini_r": 8}, "mini"), ("bat", {}, "bat")]


def peft_miss(model, variant_init, r, targets, **config):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.MissConfig(r=r, init_weights=variant_init, target_modules=targets,
                                                       **config)).eval()


def copy_blocks_into_peft(ours, theirs):
    """PEFT's ``miss_block.default`` of every module set to the rankwise layer's block."""
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            theirs.get_submodule(f"base_model.model.{name}").miss_block["default"].copy_(layer.bones())


@pytest.mark.parametrize("variant, options, peft_init", MISS_VARIANTS, ids=[v[0] for v in MISS_VARIANTS])
def test_miss_outputs_equal_peft_miss_and_the_export_loads_in_peft(variant, options, peft_init, tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = adapt(make_llama(), "miss", rank=4, targets=targets, variant=variant, **options)
    for seed, layer in enumerate(adapter_layers(ours).values()):
        fill(layer.miss_block, seed=seed, scale=0.05)
    theirs = peft_miss(make_llama(), peft_init, 4, targets, mini_r=options.get("mini_r", 1))
    copy_blocks_into_peft(ours, theirs)
    batch = make_batch()
    with torch.no_grad():
        expected = theirs(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, atol=ATOL, rtol=0)
    report = export_peft(ours, tmp_path)
    assert report["peft_type"] == "MISS" and report["exact"]
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=ATOL, rtol=0)


def test_miss_pads_an_input_width_that_r_does_not_divide_as_peft_does():
    weight = constructed(5, 7, dtype=torch.float32)
    ours = adapt(OneLayer(weight.clone()), "miss", rank=3, targets=["proj"])
    fill(only_layer(ours).miss_block)
    block = only_layer(ours).miss_block.detach()
    expected = torch.zeros(5, 7)
    for o in range(5):
        for i in range(7):
            expected[o, i] = block[i % 3, o]  # dW[o, i] = D[i mod r, o]
    torch.testing.assert_close(only_layer(ours).delta_weight(), expected, atol=1e-7, rtol=0)
    theirs = peft_miss(OneLayer(weight.clone()), True, 3, ["proj"])
    copy_blocks_into_peft(ours, theirs)
    x = torch.randn(4, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), x @ (weight + expected).T, atol=1e-6, rtol=0)


def test_bone_col_is_peft_miss_bat():
    targets = ["q_proj", "down_proj"]
    ours = adapt(make_llama(), "bone", rank=4, targets=targets)
    for seed, layer in enumerate(adapter_layers(ours).values()):
        fill(layer.bone, seed=seed, scale=0.1)
    theirs = peft_miss(make_llama(), "bat", 4, targets)
    copy_blocks_into_peft(ours, theirs)
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=ATOL, rtol=0)


def test_miss_mini_r_must_divide_the_output():
    with pytest.raises(RankwiseError, match="mini_r=3 must divide out_features=32"):
        adapt(make_llama(), "miss", rank=4, variant="mini", mini_r=3, targets=["q_proj"])


def test_miss_update_is_exactly_rank_r_and_exports_as_an_exact_lora_on_gpt2():
    from conftest import make_gpt2

    model = adapt(make_gpt2(), "miss", rank=4, targets=["c_attn"])
    for layer in adapter_layers(model).values():
        fill(layer.miss_block, scale=0.1)
        up, down = layer.lora_factors()
        torch.testing.assert_close(up @ down, layer.delta_weight().float(), atol=1e-7, rtol=0)
        assert torch.linalg.matrix_rank(layer.delta_weight().double()) == 4
    assert all(layer.peft_native() is None for layer in adapter_layers(model).values())  # Conv1D: not PEFT's
