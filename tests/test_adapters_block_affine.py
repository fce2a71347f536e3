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
