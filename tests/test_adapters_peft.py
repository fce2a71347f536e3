"""PEFT interoperability: export_peft / import_peft against peft.PeftModel as the oracle.

- export of lora / rsLoRA / per-module ranks loads with ``PeftModel.from_pretrained(original
  base, dir)`` and gives the rankwise model's outputs (tiny LLaMA and the real MiniLM encoder);
- an adapter saved by PEFT imports with PeftModel's outputs; export -> import round trip;
- a table over EVERY registered method: adapt, perturb the trainable tensors, export, load in
  PEFT onto the ORIGINAL base; exact exports give identical outputs, inexact ones report the
  true relative Frobenius error of the exported update (measured with PEFT's own delta);
- bad input raises a RankwiseError and leaves the model (and the directory) untouched.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from cases import collect
from conftest import make_batch, make_llama
from rankwise.adapters import (
    ADAPTERS,
    AdapterLayer,
    adapt,
    adapter_layers,
    export_peft,
    import_peft,
    merge,
)
from rankwise.adapters.lora import LoraLayer
from rankwise.errors import RankwiseError
from conftest import register_for_test

peft = pytest.importorskip("peft")

RANK = 4
ATOL = 1e-5
PEFT_PREFIX = "base_model.model."


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
        register_for_test(monkeypatch, ADAPTERS, name, cls)


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


def peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    """``{module path: PEFT's delta weight}`` -- the update PEFT applies, computed by PEFT."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {
        name.removeprefix(PEFT_PREFIX): module.get_delta_weight("default").float()
        for name, module in peft_model.named_modules()
        if isinstance(module, PeftLoraLayer)
    }


def true_updates(model, original) -> dict[str, torch.Tensor]:
    """``W_eff - W0`` per adapted module, from a merged copy and the untouched original base."""
    merged = merge(copy.deepcopy(model))
    return {
        name: layer.base.weight.float() - original.get_submodule(name).weight.float()
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


def randomise_peft_b(peft_model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


# ----- export of LoRA: PEFT reproduces the rankwise model --------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"alpha": 16}, {"alpha": 16, "rslora": True}, {"alpha": 3, "dropout": 0.1}],
    ids=["lora", "rslora", "lora-dropout"],
)
def test_exported_lora_loads_in_peft_with_identical_outputs(options, batch, tmp_path):
    model = perturb(adapt(make_llama(), "lora", rank=RANK, targets=["q_proj", "v_proj", "down_proj"], **options))
    report = export_peft(model, tmp_path)
    assert report["exact"] and all(m["source"] == "lora" for m in report["modules"].values())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == options["alpha"]
    assert config["use_rslora"] == options.get("rslora", False)
    assert config["lora_dropout"] == options.get("dropout", 0.0)
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)
    # A plain LoRA is written as its own factors, so training can continue in PEFT unchanged.
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in adapter_layers(model).items():
        assert torch.equal(tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"], layer.lora_A.detach())
        assert torch.equal(tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"], layer.lora_B.detach())


def test_per_module_ranks_export_with_rank_and_alpha_patterns(monkeypatch, batch, tmp_path):
    ranks = {"q_proj": 2, "v_proj": 6, "down_proj": 4, "up_proj": 4}

    def allocate(cls, rank, bases, stats, options):
        return {name: ranks[name.rpartition(".")[2]] for name in bases}

    monkeypatch.setattr(LoraLayer, "allocate_ranks", classmethod(allocate))
    model = perturb(adapt(make_llama(), "lora", rank=4, alpha=8, targets=list(ranks)))
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and len(config["rank_pattern"]) == 4  # the 4 q/v layers differ from the common r
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    for name, module in loaded.named_modules():
        if hasattr(module, "r") and isinstance(module.r, dict):
            assert module.r["default"] == ranks[name.rpartition(".")[2]], name
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)


class Nested(nn.Module):
    """``fc`` and ``inner.fc``: a module path that is a dotted suffix of another one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.other = nn.Linear(8, 8), nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner.fc(self.fc(x)) + self.other(x)


def test_rank_pattern_keys_match_only_their_own_module(monkeypatch, tmp_path):
    ranks = {"fc": 2, "inner.fc": 4, "other": 4}
    monkeypatch.setattr(LoraLayer, "allocate_ranks", classmethod(lambda cls, rank, bases, stats, opts: ranks))
    model = perturb(adapt(Nested(), "lora", rank=4))
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["rank_pattern"] == {"^fc": 2}
    loaded = peft.PeftModel.from_pretrained(Nested(), tmp_path)  # "fc" would also match "inner.fc" unanchored
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(import_peft(Nested(), tmp_path)(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_export_on_the_real_minilm_encoder(rslora, minilm_path, tmp_path):
    from transformers import AutoModel

    def fresh():
        return AutoModel.from_pretrained(minilm_path).eval()

    model = adapt(fresh(), "lora", rank=RANK, alpha=8, rslora=rslora, targets=["query", "value", "dense"])
    perturb(model)
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 1000, (2, 12), generator=generator),
              "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "FEATURE_EXTRACTION" and config["base_model_name_or_path"] == minilm_path
    loaded = peft.PeftModel.from_pretrained(fresh(), tmp_path)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        torch.testing.assert_close(loaded(**inputs).last_hidden_state, expected, atol=ATOL, rtol=0)
        reimported = import_peft(fresh(), tmp_path)
        torch.testing.assert_close(reimported(**inputs).last_hidden_state, expected, atol=ATOL, rtol=0)


def test_classifier_head_model_exports_without_task_type(tmp_path):
    """PEFT's SEQ_CLS would copy the classifier into modules_to_save and skip its LoRA."""
    from transformers import BertConfig, BertForSequenceClassification

    def fresh():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, num_labels=3)
        return BertForSequenceClassification(config).eval()

    model = perturb(adapt(fresh(), "lora", rank=2, targets=["query", "classifier"]))
    export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    loaded = peft.PeftModel.from_pretrained(fresh(), tmp_path)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_export_is_merge_aware_and_leaves_the_model_alone(batch, tmp_path):
    model = perturb(adapt(make_llama(), "peft-rewrite-probe", rank=RANK, targets=["q_proj", "up_proj"]))
    unmerged_report = export_peft(model, tmp_path / "unmerged")
    merge(model)
    before = snapshot(model)
    merged_report = export_peft(model, tmp_path / "merged")
    assert_untouched(model, before)
    assert merged_report["modules"].keys() == unmerged_report["modules"].keys()
    first = load_file(tmp_path / "unmerged" / "adapter_model.safetensors")
    second = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    for key, value in first.items():
        assert torch.equal(second[key], value), key
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "merged")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)


def test_rewriting_method_is_exported_against_the_original_weight(batch, tmp_path):
    """``[B, -B0] [A; A0]``: rank k + k0, alpha = rank (scaling 1), exact on the ORIGINAL base."""
    model = perturb(adapt(make_llama(), "peft-rewrite-probe", rank=RANK, targets=["k_proj", "gate_proj"]))
    report = export_peft(model, tmp_path)
    assert report["exact"]
    assert all(m["rank"] == 2 * RANK and m["alpha"] == 2 * RANK and m["source"] == "factors"
               for m in report["modules"].values())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in adapter_layers(model).items():
        lora_b = tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        torch.testing.assert_close(lora_b[:, :RANK], layer.lora_B.detach())
        torch.testing.assert_close(lora_b[:, RANK:], -layer.B0)
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)


# ----- non-factored updates: truncated SVD with the error reported ------------------------------


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


def test_full_rank_svd_export_is_exact(batch, tmp_path):
    model = perturb(adapt(make_llama(), "peft-dense-probe", rank=RANK, targets=["q_proj"]))
    report = export_peft(model, tmp_path, rank=32, require_exact=True)
    assert report["exact"] and report["max_relative_error"] < 1e-5
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)


def test_offset_without_factors_falls_back_to_svd_and_is_exact_at_rank_2k(batch, tmp_path):
    model = perturb(adapt(make_llama(), "peft-rewrite-unfactored", rank=RANK, targets=["v_proj"]))
    assert not export_peft(model, tmp_path / "k")["exact"]
    report = export_peft(model, tmp_path / "2k", rank=2 * RANK)
    assert report["exact"] and all(m["source"] == "svd" for m in report["modules"].values())
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "2k")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)


def test_require_exact_refuses_before_writing(tmp_path):
    model = perturb(adapt(make_llama(), "peft-dense-probe", rank=RANK, targets=["q_proj"]))
    with pytest.raises(RankwiseError, match="require_exact=True.*larger rank"):
        export_peft(model, tmp_path / "out", require_exact=True)
    assert not (tmp_path / "out").exists()


# ----- the table: every registered method ------------------------------------------------------


def _method_rows() -> list[tuple]:
    """``(id, options, needs_data, method)``: every method rankwise ships (options from its first
    tests/cases row, if any; methods other test files register are skipped) plus this file's
    test-only methods."""
    rows = {}
    for case in collect("adapters_"):
        rows.setdefault(case.method, (case.id, case.options, case.needs_data, case.method))
    shipped = [m for m in rankwise.methods() if ADAPTERS.get(m).__module__.startswith("rankwise.")]
    registered = [rows.get(m, (m, {}, ADAPTERS.get(m).needs_data(), m)) for m in shipped]
    return registered + [(f"{m} (test-only)", {}, False, m) for m in TEST_ONLY_METHODS]


METHOD_ROWS = _method_rows()


@pytest.mark.parametrize("case_id, options, needs_data, method", METHOD_ROWS, ids=[r[0] for r in METHOD_ROWS])
def test_every_method_exports_to_peft_on_the_original_base(case_id, options, needs_data, method, batch, tmp_path):
    data = [make_batch(seed=1), make_batch(seed=2)] if needs_data else None
    model = perturb(adapt(make_llama(), method, rank=RANK, data=data, **options))
    original = make_llama()
    report = export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)

    exported, truth = peft_deltas(loaded), true_updates(model, original)
    assert exported.keys() == truth.keys() == report["modules"].keys()
    for name, update in truth.items():
        measured = (torch.linalg.matrix_norm(update - exported[name]) / torch.linalg.matrix_norm(update)).item()
        entry = report["modules"][name]
        if entry["exact"]:
            assert measured < 1e-4, (name, measured)
        else:
            assert entry["relative_error"] == pytest.approx(measured, rel=1e-3, abs=1e-6), name
            assert measured > 1e-4, name  # "inexact" must mean a visible approximation

    gap = (logits(loaded, batch) - logits(model, batch)).abs().max().item()
    if report["exact"]:
        assert gap < ATOL
    else:
        assert gap > ATOL, "an approximated update must change the outputs measurably"
        full = export_peft(model, tmp_path / "full", rank=64)
        assert full["exact"]
        loaded_full = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "full")
        assert (logits(loaded_full, batch) - logits(model, batch)).abs().max().item() < ATOL


# ----- import of adapters saved by PEFT --------------------------------------------------------


def save_peft_adapter(directory, *, seed=0, **config):
    settings = {"r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **config}
    model = peft.get_peft_model(make_llama(), peft.LoraConfig(**settings))
    randomise_peft_b(model, seed)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize(
    "config",
    [{}, {"use_rslora": True}, {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"layers.1.mlp.down_proj": 3}},
     {"target_modules": "all-linear", "init_lora_weights": "gaussian"}],
    ids=["lora", "rslora", "patterns", "all-linear-gaussian"],
)
def test_import_of_a_peft_adapter_matches_peft(config, batch, tmp_path):
    reference = save_peft_adapter(tmp_path, **config)
    model = import_peft(make_llama(), tmp_path)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), atol=ATOL, rtol=0)
    layers = adapter_layers(model)
    assert layers and all(type(layer) is LoraLayer for layer in layers.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.{factor}" for name in layers for factor in ("lora_A", "lora_B")
    }
    if "rank_pattern" in config:
        assert {layer.rank for name, layer in layers.items() if name.endswith("q_proj")} == {2}
        assert layers["model.layers.1.mlp.down_proj"].alpha == 3
        assert layers["model.layers.0.mlp.down_proj"].alpha == 8
    # and back to PEFT: the per-module ranks and alphas are written as rank / alpha patterns
    export_peft(model, tmp_path / "again")
    reloaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "again")
    torch.testing.assert_close(logits(reloaded, batch), logits(reference, batch), atol=ATOL, rtol=0)


def test_export_import_round_trip(batch, tmp_path):
    model = perturb(adapt(make_llama(), "peft-rewrite-probe", rank=RANK, targets=["q_proj", "down_proj"]))
    export_peft(model, tmp_path)
    imported = import_peft(make_llama(), tmp_path)
    torch.testing.assert_close(logits(imported, batch), logits(model, batch), atol=ATOL, rtol=0)
    # and back: the imported lora exports as itself
    export_peft(imported, tmp_path / "again")
    first, second = (load_file(p / "adapter_model.safetensors") for p in (tmp_path, tmp_path / "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ----- bad input ------------------------------------------------------------------------------


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
    "fan-in-fan-out": (lambda d: _edit_config(d, fan_in_fan_out=True), "fan_in_fan_out"),
    "pissa-init": (lambda d: _edit_config(d, init_lora_weights="pissa_niter_4"), "rewrites the base"),
    "modules-to-save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "unpaired-factor": (_drop_b, "no lora_B"),
    "config-disagrees": (lambda d: _edit_config(d, target_modules=["k_proj"]), "disagree"),
    "truncated-weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00" * 7), "safetensors"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_import_rejects_bad_adapters_and_leaves_the_model(breakage, tmp_path):
    save_peft_adapter(tmp_path)
    damage, message = BREAKAGES[breakage]
    damage(tmp_path)
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(RankwiseError, match=message):
        import_peft(model, tmp_path)
    assert_untouched(model, before)


def test_import_onto_an_adapted_model_is_refused(tmp_path, batch):
    save_peft_adapter(tmp_path)
    model = perturb(adapt(make_llama(), "lora", rank=RANK, targets=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(RankwiseError, match="stacking"):
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


def test_pruned_layers_are_left_out_and_an_all_zero_update_is_refused(batch, tmp_path):
    from peft import PeftModel

    model = rankwise.adapt(make_llama(), "sora", rank=4, targets=["q_proj", "v_proj"])
    layers = list(rankwise.adapters.adapter_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_()
        for layer in layers[:2]:
            layer.gate.zero_()
    report = rankwise.export_peft(model, tmp_path / "some", require_exact=True)
    assert len(report["modules"]) == len(layers) - 2
    peft_model = PeftModel.from_pretrained(make_llama(), tmp_path / "some")
    torch.testing.assert_close(peft_model(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        for layer in layers:
            layer.gate.zero_()
    with pytest.raises(RankwiseError, match="nothing to export"):
        rankwise.export_peft(model, tmp_path / "none")
    assert not (tmp_path / "none").exists()
