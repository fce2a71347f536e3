"""PEFT interoperability with peft.PeftModel as the oracle (this module needs PEFT; the checks
that do not are in tests/test_adapters_peft_io.py).

- export of lora / rsLoRA / per-module ranks loads with ``PeftModel.from_pretrained(original
  base, dir)`` and gives the rankwise model's outputs (tiny LLaMA and the real MiniLM encoder);
- an adapter saved by PEFT imports with PeftModel's outputs; export -> import round trip;
- a table over EVERY row of the common suite (alpha = 2 * rank, so an export that writes
  ``lora_alpha = r`` changes PEFT's scaling): adapt, perturb the trainable tensors, export,
  load in PEFT onto the ORIGINAL base; exact exports give identical outputs, inexact ones
  report the true relative Frobenius error of the exported update (measured with PEFT's own
  delta).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rankwise
from cases import collect
from conftest import make_batch, make_llama
from rankwise.adapters import adapt, adapter_layers, export_peft, import_peft, merge
from rankwise.adapters.lora import LoraLayer
from rankwise.errors import RankwiseError
from test_adapters_peft_io import (  # noqa: F401  (the autouse fixture registers the test-only methods here too)
    ATOL,
    RANK,
    TEST_ONLY_METHODS,
    _register_test_only_methods,
    logits,
    perturb,
    snapshot,
    assert_untouched,
    true_updates,
)

peft = pytest.importorskip("peft")

PEFT_PREFIX = "base_model.model."


# ----- helpers ---------------------------------------------------------------------------------


def peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    """``{module path: PEFT's delta weight}`` -- the update PEFT applies, computed by PEFT (any of its
    tuner layers: LoRA, or a method's own format written by ``peft_native``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name.removeprefix(PEFT_PREFIX): module.get_delta_weight("default").float()
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


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


# ----- the table: every registered method ------------------------------------------------------


def _method_rows() -> list[tuple]:
    """``(id, options, needs_data, method)``: the first common-suite row of every shipped method
    (tests/test_adapters.py fails for a method without one) plus the test-only methods."""
    rows = {}
    for case in collect("adapters_"):
        rows.setdefault(case.method, (case.id, case.options, case.needs_data, case.method, case.quantizes_base))
    return list(rows.values()) + [(f"{m} (test-only)", {}, False, m, False) for m in TEST_ONLY_METHODS]


METHOD_ROWS = _method_rows()


@pytest.mark.parametrize("case_id, options, needs_data, method, quantizes_base", METHOD_ROWS,
                         ids=[r[0] for r in METHOD_ROWS])
def test_every_method_exports_to_peft_on_the_original_base(case_id, options, needs_data, method, quantizes_base,
                                                           batch, tmp_path):
    data = [make_batch(seed=1), make_batch(seed=2)] if needs_data else None
    model = perturb(adapt(make_llama(), method, rank=RANK, alpha=2 * RANK, data=data, **options))
    # LoftQ's base is NF4 codes (of W itself at loftq_iter=1): a PEFT QLoRA adapter of the quantized model
    base = (lambda: rankwise.quantize(make_llama(), "nf4")) if quantizes_base else make_llama
    original = base()
    report = export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base(), tmp_path)

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
        loaded_full = peft.PeftModel.from_pretrained(base(), tmp_path / "full")
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


def test_pruned_layers_are_left_out_and_an_all_zero_update_is_refused(batch, tmp_path):
    model = rankwise.adapt(make_llama(), "sora", rank=4, targets=["q_proj", "v_proj"])
    layers = list(rankwise.adapters.adapter_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_()
        for layer in layers[:2]:
            layer.gate.zero_()
    report = rankwise.export_peft(model, tmp_path / "some", require_exact=True)
    assert len(report["modules"]) == len(layers) - 2
    peft_model = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "some")
    torch.testing.assert_close(peft_model(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        for layer in layers:
            layer.gate.zero_()
    with pytest.raises(RankwiseError, match="nothing to export"):
        rankwise.export_peft(model, tmp_path / "none")
    assert not (tmp_path / "none").exists()


# ----- native PEFT formats (AdapterLayer.peft_native) -------------------------------------------


class NativeLoraProbe(LoraLayer):
    """A test-only LoRA that describes itself in PEFT's own terms, as DoRA / VeRA / LoHa do."""

    def peft_native(self):
        from rankwise.adapters.base import PeftNative

        return PeftNative(
            "LORA",
            {"r": self.rank, "lora_alpha": self.alpha, "use_dora": False},
            {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B},
        )


def test_native_forms_are_written_in_their_own_format_and_load_in_peft(monkeypatch, batch, tmp_path):
    from conftest import register_for_test
    from rankwise.adapters.base import ADAPTERS

    register_for_test(monkeypatch, ADAPTERS, "native-probe", NativeLoraProbe,
                      supports=frozenset({"linear", "conv1d"}))
    model = adapt(make_llama(), "native-probe", rank=RANK, alpha=2 * RANK, targets=["q_proj", "v_proj"])
    perturb(model)
    expected = logits(model, batch)
    report = export_peft(model, tmp_path)
    assert report["peft_type"] == "LORA" and {m["source"] for m in report["modules"].values()} == {"native"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == 2 * RANK and len(config["target_modules"]) == 4
    loaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)


def test_a_mix_of_native_and_other_layers_falls_back_to_the_lora_export(monkeypatch, batch, tmp_path):
    from conftest import register_for_test
    from rankwise.adapters.base import ADAPTERS

    register_for_test(monkeypatch, ADAPTERS, "native-probe", NativeLoraProbe,
                      supports=frozenset({"linear", "conv1d"}))
    model = adapt(make_llama(), "native-probe", rank=RANK, alpha=2 * RANK, targets=["q_proj"])
    perturb(model)
    next(iter(adapter_layers(model).values())).peft_native = lambda: None  # one layer without a native form
    report = export_peft(model, tmp_path)
    assert "peft_type" not in report and {m["source"] for m in report["modules"].values()} == {"lora"}
