"""PEFT format without PEFT installed: export reports and refusals, import validation.

The test-only methods here exercise export paths no shipped method uses yet (a dense update
exported by truncated SVD, a base rewrite with and without offset factors); the PEFT oracle
tests in tests/test_adapters_peft.py reuse them. Adapter directories to break are written by
``export_peft`` of a plain LoRA (the same LoraConfig fields PEFT writes), so every refusal is
tested whether or not PEFT is installed; bad input raises a RankwiseError and leaves the model
(and the directory) untouched.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import make_llama, register_for_test
from rankwise.adapters import ADAPTERS, AdapterLayer, adapt, adapter_layers, export_peft, import_peft, merge
from rankwise.adapters.base import LINEAR_LIKE
from rankwise.layers import dense_weight
from rankwise.errors import RankwiseError

RANK = 4
ATOL = 1e-5


# ----- test-only methods: the export paths no shipped method may exercise yet ----------------


class DenseProbe(AdapterLayer):
    """A full-rank update ``delta`` (out x in): no factors, so export goes through the truncated SVD."""

    def __init__(self, base, rank, alpha, **options):
        super().__init__(base, rank, alpha, **options)
        self.delta = nn.Parameter(torch.empty(self.out_features, self.in_features, **self.factory))

    def initialize(self, stats=None):
        nn.init.zeros_(self.delta)

    def delta_weight(self):
        return self.delta


class RewriteProbe(AdapterLayer):
    """PiSSA-like base rewrite with exact factors: ``A0`` = first r coordinates, ``B0 = W A0^T``;
    the trainable ``B A`` starts at ``B0 A0`` and the base becomes ``W - B0 A0``."""

    rewrites_base = True

    def __init__(self, base, rank, alpha, **options):
        super().__init__(base, rank, alpha, **options)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **self.factory))
        self.register_buffer("A0", torch.empty(rank, self.in_features, **self.factory))
        self.register_buffer("B0", torch.empty(self.out_features, rank, **self.factory))

    def initialize(self, stats=None):
        with torch.no_grad():
            self.A0.copy_(torch.eye(self.rank, self.in_features))
            self.B0.copy_(self.base.weight.float() @ self.A0.T)
            self.lora_A.copy_(self.A0)
            self.lora_B.copy_(self.B0)

    def delta_weight(self):
        return self.lora_B @ self.lora_A

    def base_offset(self):
        return self.B0 @ self.A0

    def lora_factors(self):
        return self.lora_B.detach().float(), self.lora_A.detach().float()

    def base_offset_factors(self):
        return self.B0.float(), self.A0.float()


class RewriteUnfactoredOffset(RewriteProbe):
    """Same, but the offset's factors are not offered: export falls back to the SVD of ``BA - B0A0``."""

    def base_offset_factors(self):
        return None


TEST_ONLY_METHODS = {
    "peft-dense-probe": DenseProbe,
    "peft-rewrite-probe": RewriteProbe,
    "peft-rewrite-unfactored": RewriteUnfactoredOffset,
}


@pytest.fixture(autouse=True)
def _register_test_only_methods(monkeypatch):
    for name, cls in TEST_ONLY_METHODS.items():
        register_for_test(monkeypatch, ADAPTERS, name, cls, supports=frozenset(LINEAR_LIKE))


# ----- helpers ---------------------------------------------------------------------------------


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def perturb(model, seed=0, scale=0.05):
    """Move every trainable adapter tensor off its init so the update is non-trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator).to(p))
    return model


def true_updates(model, original) -> dict[str, torch.Tensor]:
    """``W_eff - W0`` per adapted module, from a merged copy and the untouched original base (on a
    quantized base the merge would round: the stored weight plus the update, unrounded)."""
    if any(layer.quantized for layer in adapter_layers(model).values()):
        return {name: dense_weight(layer.base, torch.float32) + layer.delta_weight().detach().float()
                - dense_weight(original.get_submodule(name), torch.float32)
                for name, layer in adapter_layers(model).items()}
    merged = merge(copy.deepcopy(model))
    return {
        name: dense_weight(layer.base, torch.float32) - dense_weight(original.get_submodule(name), torch.float32)
        for name, layer in adapter_layers(merged).items()
    }


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "types": {k: type(m) for k, m in model.named_modules()},
        "merged": {k: m.merged for k, m in adapter_layers(model).items()},
    }


def assert_untouched(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"] and after["flags"] == before["flags"]
    assert after["merged"] == before["merged"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


# ----- export reports and refusals -------------------------------------------------------------


def test_dense_update_exports_best_rank_k_with_its_error(batch, tmp_path):
    model = perturb(adapt(make_llama(), "peft-dense-probe", rank=RANK, targets=["q_proj", "down_proj"]))
    report = export_peft(model, tmp_path)
    assert not report["exact"]
    updates = true_updates(model, make_llama())
    for name, update in updates.items():
        singular = torch.linalg.svdvals(update)
        eckart_young = (singular[RANK:].square().sum() / singular.square().sum()).sqrt().item()
        entry = report["modules"][name]
        assert entry["source"] == "svd" and entry["rank"] == RANK and not entry["exact"]
        assert entry["relative_error"] == pytest.approx(eckart_young, rel=1e-4)
    assert report["max_relative_error"] == max(m["relative_error"] for m in report["modules"].values())


def test_require_exact_refuses_before_writing(tmp_path):
    model = perturb(adapt(make_llama(), "peft-dense-probe", rank=RANK, targets=["q_proj"]))
    with pytest.raises(RankwiseError, match="require_exact=True.*larger rank"):
        export_peft(model, tmp_path / "out", require_exact=True)
    assert not (tmp_path / "out").exists()


# ----- bad input ------------------------------------------------------------------------------


def save_lora_adapter(directory: Path) -> None:
    """A valid PEFT LoRA adapter (q/v/down_proj, r = 4, alpha = 8) written by export_peft."""
    model = perturb(adapt(make_llama(), "lora", rank=RANK, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    export_peft(model, directory)


def _edit_config(directory: Path, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rename_module(directory: Path):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj"): v for k, v in tensors.items()},
              path)


def _drop_b(directory: Path):
    path = directory / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "layers.1.mlp.down_proj.lora_B" not in k}, path)


def _to_bin(directory: Path):
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")


BREAKAGES = {
    "missing-dir": (lambda d: __import__("shutil").rmtree(d), "does not exist"),
    "corrupt-json": (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    "wrong-peft-type": (lambda d: _edit_config(d, peft_type="IA3"), "LoRA adapters only"),
    "missing-module": (_rename_module, "no such module"),
    "shape-mismatch": (lambda d: _edit_config(d, r=8), r"shape \(4, \d+\), expected \(8, \d+\)"),
    "bad-rank-pattern": (lambda d: _edit_config(d, rank_pattern={"q_proj": "big"}),
                         r"rank_pattern\['q_proj'\] must be an integer >= 1"),
    "pickle-weights": (_to_bin, "pickle"),
    "dora": (lambda d: _edit_config(d, use_dora=True), "use_dora"),
    "bias": (lambda d: _edit_config(d, bias="all"), "bias='all'"),
    "pissa-init": (lambda d: _edit_config(d, init_lora_weights="pissa_niter_4"), "rewrites the base"),
    "modules-to-save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "unpaired-factor": (_drop_b, "no lora_B"),
    "config-disagrees": (lambda d: _edit_config(d, target_modules=["k_proj"]), "disagree"),
    "truncated-weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 7), "safetensors"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_import_rejects_bad_adapters_and_leaves_the_model(breakage, tmp_path):
    save_lora_adapter(tmp_path)
    damage, message = BREAKAGES[breakage]
    damage(tmp_path)
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(RankwiseError, match=message):
        import_peft(model, tmp_path)
    assert_untouched(model, before)


def test_import_onto_an_adapted_model_is_refused(tmp_path, batch):
    save_lora_adapter(tmp_path)
    model = perturb(adapt(make_llama(), "lora", rank=RANK, targets=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(RankwiseError, match="already holds an adapter named 'default'"):
        import_peft(model, tmp_path)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"rank": 0}, "option rank must be None or an integer >= 1"), ({"rank": True}, "must be None or an integer >= 1")],
)
def test_export_rejects_bad_arguments(kwargs, message, tmp_path):
    model = adapt(make_llama(), "lora", rank=RANK, targets=["q_proj"])
    with pytest.raises(RankwiseError, match=message):
        export_peft(model, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_export_needs_adapters_and_a_directory(tmp_path):
    with pytest.raises(RankwiseError, match="no adapters"):
        export_peft(make_llama(), tmp_path)
    model = adapt(make_llama(), "lora", rank=RANK, targets=["q_proj"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(RankwiseError, match="not a directory"):
        export_peft(model, tmp_path / "file")
