"""Common, table-driven tests for every adapter method, plus the framework's error paths.

Each method contributes ONE row, in tests/cases/adapters_<family>.py; every test below runs on every row, and a
registered method without a row fails the suite. A row says whether the method needs data,
whether its output equals the base model's at init, and how many trainable parameters one
adapted ``n_out x n_in`` layer has at rank ``r``. Every row runs with ``alpha = 2 * rank``, so
a scaling that is dropped or applied twice on any path (unmerged forward, merge, save/load)
changes an output.

Two test-only methods, registered for this module only, exercise framework paths that no
shipped method may use yet: ``probe`` (data-driven: input covariance + full-weight gradient,
and base-rewriting) and ``shared-probe`` (a tensor shared by all layers, saved once).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cases import AdapterCase, collect
from conftest import make_batch, make_llama
from rankwise.adapters import (
    ADAPTERS,
    AdapterLayer,
    adapt,
    adapter_layers,
    collect_layer_inputs,
    collect_weight_gradients,
    load_adapter,
    merge,
    method_options,
    methods,
    save_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from rankwise.adapters.base import LINEAR_LIKE, AdapterRegistry
from rankwise.calibration import collect_statistics
from rankwise.common_options import NITER
from rankwise.errors import RankwiseError
from rankwise.linalg.covariance import CovarianceAccumulator
from rankwise.options import describe
from rankwise.targets import match_targets
from conftest import register_for_test

RANK = 4
ALPHA = 2 * RANK  # alpha != rank: LoRA's scaling is 2, not 1, so every scaling path matters
ATOL = 1e-5


# ----- test-only methods ---------------------------------------------------------------------


class ProbeLayer(AdapterLayer):
    """Data-driven, base-rewriting: A0 = top-r eigenvectors of E[x x^T], B0 = W A0^T.

    The base becomes ``W - B0 A0`` and the trainable ``B A`` starts at ``B0 A0`` (identity
    at init). ``initialize`` also checks it received the full-weight gradient.
    """

    statistics = ("input_covariance", "weight_gradient")
    rewrites_base = True

    def __init__(self, base, rank, alpha, **options):
        super().__init__(base, rank, alpha, **options)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **self.factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **self.factory))
        self.register_buffer("A0", torch.empty(rank, self.in_features, **self.factory))
        self.register_buffer("B0", torch.empty(self.out_features, rank, **self.factory))

    def initialize(self, stats=None):
        assert stats.weight_gradient.shape == self.base.weight.shape
        assert torch.isfinite(stats.weight_gradient).all() and stats.weight_gradient.abs().sum() > 0
        _, vectors = torch.linalg.eigh(stats.input_covariance.second_moment())
        top = vectors[:, -self.rank :].T.contiguous()
        with torch.no_grad():
            self.A0.copy_(top)
            self.B0.copy_(self.base.weight.float() @ top.T)
            self.lora_A.copy_(self.A0)
            self.lora_B.copy_(self.B0)

    def delta_weight(self):
        return self.lora_B @ self.lora_A

    def base_offset(self):
        return self.B0 @ self.A0


class SharedProbeLayer(AdapterLayer):
    """VeRA-like: a frozen random ``proj`` (r x 64) shared by all layers; trainable ``scale`` (r), ``up`` (out x r)."""

    SHARED_WIDTH = 64

    @classmethod
    def make_shared(cls, bases, rank, options):
        generator = torch.Generator().manual_seed(0)
        return {"proj": torch.randn(rank, cls.SHARED_WIDTH, generator=generator) / math.sqrt(cls.SHARED_WIDTH)}

    def __init__(self, base, rank, alpha, **options):
        super().__init__(base, rank, alpha, **options)
        self.register_buffer("proj", self.shared["proj"])
        self.scale = nn.Parameter(torch.empty(rank, **self.factory))
        self.up = nn.Parameter(torch.empty(self.out_features, rank, **self.factory))

    def initialize(self, stats=None):
        with torch.no_grad():
            self.scale.fill_(1.0)
            self.up.zero_()

    def delta_weight(self):
        return self.up @ (self.scale[:, None] * self.proj[:, : self.in_features])


TEST_ONLY_METHODS = {"probe": ProbeLayer, "shared-probe": SharedProbeLayer}


@pytest.fixture(autouse=True)
def _register_test_only_methods(monkeypatch):
    for name, cls in TEST_ONLY_METHODS.items():
        register_for_test(monkeypatch, ADAPTERS, name, cls, supports=frozenset(LINEAR_LIKE))


# ----- the table -----------------------------------------------------------------------------


Case = AdapterCase

CASES = collect("adapters_") + [
    Case("probe (test-only)", "probe", {}, True, True, lambda n_in, n_out, r: r * (n_in + n_out)),
    Case("shared-probe (test-only)", "shared-probe", {}, False, True, lambda n_in, n_out, r: r * n_out + r),
]

cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def data_batches() -> list[dict]:
    return [make_batch(seed=1), make_batch(seed=2)]


def adapted(case: Case, model: nn.Module | None = None) -> nn.Module:
    model = make_llama() if model is None else model
    data = data_batches() if case.needs_data else None
    return adapt(model, case.method, rank=RANK, alpha=ALPHA, data=data, **case.options)


def train(model: nn.Module, batch: dict, steps: int, lr: float = 1e-2) -> list[float]:
    """Adam on the trainable parameters in train mode; returns the loss before each step."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "types": {k: type(m) for k, m in model.named_modules()},
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["flags"] == before["flags"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def adapter_param_ids(model: nn.Module) -> set[int]:
    return {
        id(p)
        for layer in adapter_layers(model).values()
        for key, p in layer.named_parameters()
        if not key.startswith("base.")
    }


# ----- the common suite ----------------------------------------------------------------------


def test_methods_lists_registered_names():
    assert "lora" in methods()
    assert methods() == sorted(methods())


def test_registration_derives_needs_data_and_names_layer_types():
    registry = AdapterRegistry("adapter method")
    registry.register("probe", family="test", paper="p", supports=("linear",))(ProbeLayer)
    registry.register("shared", family="test", paper="p", supports=("linear",))(SharedProbeLayer)
    assert registry.entry("probe").needs_data and not registry.entry("shared").needs_data
    assert registry.entry("probe").supports == {"linear"}
    with pytest.raises(RuntimeError, match="registered with needs_data=False but its class collects statistics"):
        registry.register("wrong", family="test", paper="p", supports=("linear",), needs_data=False)(ProbeLayer)
    with pytest.raises(RuntimeError, match="unknown layer types"):
        registry.register("conv", family="test", paper="p", supports=("conv3d",))


def test_method_options_are_the_declarations_adapt_checks():
    options = method_options("corda")
    assert set(options) == {"dropout", "mode", "damping", "niter"}
    assert options["niter"] is NITER and options["dropout"] is method_options("lora")["dropout"]
    assert "mode='ipm'  (one of 'ipm', 'kpm')" in "\n".join(describe(options))
    with pytest.raises(RankwiseError, match="unknown adapter method"):
        method_options("lorra")


def test_every_registered_method_has_a_row_that_agrees_with_its_registration():
    shipped = {entry.name: entry for entry in ADAPTERS.entries() if entry.family != "test"}
    missing = sorted(set(shipped) - {case.method for case in CASES})
    assert not missing, f"registered adapter(s) without a row in tests/cases/adapters_*.py: {missing}"
    for case in CASES:
        if case.method in shipped:
            entry = shipped[case.method]
            assert case.needs_data == entry.needs_data == entry.obj.needs_data(), case.id
            # every method takes GPT-2's Conv1D; only the base rewrites refuse a quantized base
            assert {"linear", "conv1d"} <= entry.supports, case.id
            takes_quantized = {"linear4bit", "linear8bit"} <= entry.supports
            assert takes_quantized != (entry.obj.rewrites_base or entry.obj.replaces_base), case.id


@cases
def test_output_at_init(case, batch):
    reference = logits(make_llama(), batch)
    out = logits(adapted(case), batch)
    if case.identity_at_init:
        torch.testing.assert_close(out, reference, atol=ATOL, rtol=0)
    else:
        assert not torch.allclose(out, reference, atol=ATOL)


@cases
def test_only_adapter_parameters_train_and_all_get_gradients(case, batch):
    model = adapted(case)
    model.train()
    model(**batch).loss.backward()
    adapter_ids = adapter_param_ids(model)
    assert adapter_ids
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


@cases
def test_trainable_parameter_count_matches_formula(case):
    fresh = make_llama()
    expected = case.shared_trainable(RANK) + sum(
        case.trainable_per_layer(fresh.get_submodule(n).in_features, fresh.get_submodule(n).out_features, RANK)
        for n in match_targets(fresh, "all-linear")
    )
    assert trainable_parameters(adapted(case)) == expected


@cases
def test_training_lowers_loss_changes_output_and_keeps_base(case, batch):
    model = adapted(case)
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    reference = logits(make_llama(), batch)
    losses = train(model, batch, steps=5, lr=case.lr)
    assert losses[-1] < losses[0]
    assert not torch.allclose(logits(model, batch), reference, atol=ATOL)
    for k, p in model.named_parameters():
        if k in frozen:
            assert torch.equal(p, frozen[k]), k


@cases
def test_merge_unmerge_unload_keep_the_output(case, batch):
    model = adapted(case)
    train(model, batch, steps=2)
    expected = logits(model, batch)
    if case.quantizes_base:  # merging into its quantized base is lossy: refused without allow_lossy
        before = snapshot(model)
        with pytest.raises(RankwiseError, match="allow_lossy=True"):
            merge(model)
        assert_untouched(model, before)
        return
    merge(model)
    assert all(layer.merged for layer in adapter_layers(model).values())
    torch.testing.assert_close(logits(model, batch), expected, atol=ATOL, rtol=0)
    merge(model)  # idempotent
    torch.testing.assert_close(logits(model, batch), expected, atol=ATOL, rtol=0)
    unmerge(model)
    torch.testing.assert_close(logits(model, batch), expected, atol=ATOL, rtol=0)
    plain = unload(model)
    assert not adapter_layers(plain)
    assert set(plain.state_dict()) == set(make_llama().state_dict())
    assert all(p.requires_grad for p in plain.parameters())  # as before adapt
    torch.testing.assert_close(logits(plain, batch), expected, atol=ATOL, rtol=0)


@cases
def test_original_weight_is_recovered(case, batch):
    if case.quantizes_base:
        pytest.skip("the base was replaced by its quantization; the full-precision weight is not kept")
    fresh = make_llama()
    model = adapted(case)
    train(model, batch, steps=2)
    merge(model)
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.original_weight(), fresh.get_submodule(name).weight, atol=ATOL, rtol=0)


@cases
def test_save_load_roundtrip_on_a_fresh_base(case, batch, tmp_path):
    model = adapted(case)
    train(model, batch, steps=3)
    expected = logits(model, batch)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "rankwise_adapter.json").read_text())
    assert config["format"] == "rankwise-adapter" and config["version"] == 1
    assert set(config["modules"]) == set(adapter_layers(model))
    assert not [key for key in load_file(tmp_path / "rankwise_adapter.safetensors") if ".base." in key]
    loaded = load_adapter(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)
    assert trainable_parameters(loaded) == trainable_parameters(model)
    if case.quantizes_base:  # the same codes were rebuilt from the fresh base; unloading into them is lossy
        with pytest.raises(RankwiseError, match="allow_lossy=True"):
            unload(loaded)
        return
    torch.testing.assert_close(logits(unload(loaded), batch), expected, atol=ATOL, rtol=0)


# ----- bad input: the model is left exactly as it was ----------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "lora: option rank must be an integer >= 1, got 0"),
        ({"rank": -3}, "option rank must be an integer >= 1"),
        ({"rank": 2.5}, "option rank must be an integer >= 1"),
        ({"rank": True}, "option rank must be an integer >= 1"),
        ({"rank": 33}, "choose an integer in [1, 32]"),
        ({"alpha": 0}, "option alpha must be None or a number > 0"),
        ({"targets": ["no_such_layer"]}, "q_proj"),
        ({"targets": "("}, "not a valid regular expression"),
        ({"rslora": "yes"}, "rslora must be True or False"),
        ({"dropout": 1.0}, "option dropout must be a number in [0, 1)"),
        ({"data": [make_batch()]}, "does not use data"),
    ],
)
def test_bad_adapt_arguments_raise_and_leave_the_model(llama, kwargs, message):
    before = snapshot(llama)
    with pytest.raises(RankwiseError) as info:
        adapt(llama, "lora", **kwargs)
    assert message in str(info.value)
    assert_untouched(llama, before)


def test_rank_above_the_layer_limit_names_the_layer(llama):
    with pytest.raises(RankwiseError, match=r"model\.layers\.0\.mlp\.down_proj.*\[1, 32\]"):
        adapt(llama, "lora", rank=40, targets=["down_proj"])


def test_unknown_method_lists_known_ones(llama):
    before = snapshot(llama)
    with pytest.raises(RankwiseError, match="unknown adapter method 'lorra'; known: .*lora"):
        adapt(llama, "lorra")
    assert_untouched(llama, before)


def test_unknown_option_lists_the_method_options(llama):
    with pytest.raises(RankwiseError, match="unknown option.*use_dora.*dropout=0.0.*rslora=False"):
        adapt(llama, "lora", use_dora=True)


def test_adapting_twice_is_refused_and_keeps_the_first_adapter(llama, batch):
    adapt(llama, "lora", rank=RANK)
    train(llama, batch, steps=1)
    before = snapshot(llama)
    with pytest.raises(RankwiseError, match="already holds an adapter named 'default'.*another adapter_name"):
        adapt(llama, "lora", rank=2)
    assert_untouched(llama, before)


@pytest.mark.parametrize("action", [merge, unmerge, unload, lambda m: save_adapter(m, "/nonexistent/never-written")])
def test_actions_need_adapters(llama, action):
    with pytest.raises(RankwiseError, match="has no adapters"):
        action(llama)


@pytest.mark.parametrize(
    "data, message",
    [
        (None, "is data-driven: pass data="),
        ([], "data is empty"),
        (make_batch(), "not a single batch"),
        ([{"input_ids": torch.full((2, 8), 1000)}], "data batch 0 does not fit the model"),
        ([make_batch(), {"input_ids": make_batch()["input_ids"]}], "data batch 1 gave no loss"),
        (["text"], "data batch 0 is a str"),
    ],
)
def test_bad_data_for_data_driven_methods(llama, data, message):
    before = snapshot(llama)
    with pytest.raises(RankwiseError) as info:
        adapt(llama, "probe", rank=RANK, data=data)
    assert message in str(info.value)
    assert_untouched(llama, before)


class _FailingInit(ProbeLayer):
    calls = 0

    def initialize(self, stats=None):
        type(self).calls += 1
        if type(self).calls == 3:
            raise RuntimeError("init failed on the third layer")
        super().initialize(stats)


class _FailingRewrite(ProbeLayer):
    calls = 0

    def base_offset(self):
        type(self).calls += 1
        if type(self).calls == 3:
            raise RuntimeError("rewrite failed on the third layer")
        return super().base_offset()


@pytest.mark.parametrize("failing", [_FailingInit, _FailingRewrite])
def test_failure_mid_init_rolls_back(llama, monkeypatch, failing):
    register_for_test(monkeypatch, ADAPTERS, "failing", failing, supports=frozenset(LINEAR_LIKE))
    monkeypatch.setattr(failing, "calls", 0)
    before = snapshot(llama)
    with pytest.raises(RuntimeError, match="failed on the third layer"):
        adapt(llama, "failing", rank=RANK, data=data_batches())
    assert_untouched(llama, before)


@pytest.fixture(scope="module")
def saved_template(tmp_path_factory):
    model = adapt(make_llama(), "lora", rank=RANK)
    train(model, make_batch(), steps=1)
    directory = tmp_path_factory.mktemp("template") / "adapter"
    save_adapter(model, directory)
    return directory


@pytest.fixture
def saved_dir(saved_template, tmp_path):
    """A fresh copy of a valid saved LoRA adapter, free to break."""
    return Path(shutil.copytree(saved_template, tmp_path / "adapter"))


def _edit_config(directory, edit):
    path = directory / "rankwise_adapter.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    path = directory / "rankwise_adapter.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _rename_first_module(config):
    name = sorted(config["modules"])[0]
    config["modules"][name + "_renamed"] = config["modules"].pop(name)


def _set_in_every_module(**fields):
    return lambda d: _edit_config(d, lambda c: [entry.update(fields) for entry in c["modules"].values()])


def _write(file, content):
    return lambda d: (d / file).write_bytes(content)


CONFIG, TENSORS = "rankwise_adapter.json", "rankwise_adapter.safetensors"
BROKEN_DIRS = [
    ("missing directory", lambda d: d.rename(d.with_name("elsewhere")), "does not exist"),
    # what is left is the PEFT copy of the LoRA adapter: the message names import_peft
    ("missing config", lambda d: (d / CONFIG).unlink(), "holds a PEFT adapter"),
    ("corrupt config", _write(CONFIG, b"{not json"), "is not valid JSON"),
    ("foreign config", _write(CONFIG, b'{"peft_type": "LORA"}'), "is not a rankwise-adapter"),
    ("missing tensors", lambda d: (d / TENSORS).unlink(), "rankwise_adapter.safetensors is missing"),
    ("corrupt tensors", _write(TENSORS, b"\x08\x00garbage"), "not a readable safetensors"),
    ("unknown method", _set_in_every_module(method="nola-x"), "unknown method 'nola-x'"),
    ("module missing in base", lambda d: _edit_config(d, _rename_first_module), "has no module"),
    ("base shape mismatch", _set_in_every_module(base_shape=[7, 7]), "has weight shape"),
    ("bad rank in config", _set_in_every_module(rank=64), "out of range"),
    ("unknown option in config", _set_in_every_module(options={"use_dora": True}), "unknown option(s) use_dora"),
    ("missing tensor key", lambda d: _edit_tensors(d, lambda t: t.pop(sorted(t)[0])),
     "missing ['model.layers.0.mlp.down_proj.lora_A']"),
    ("unexpected tensor key", lambda d: _edit_tensors(d, lambda t: t.update(extra=torch.zeros(1))),
     "unexpected ['extra']"),
    ("tensor shape mismatch", lambda d: _edit_tensors(d, lambda t: t.update({sorted(t)[0]: torch.zeros(3, 3)})),
     "has shape (3, 3)"),
]


@pytest.mark.parametrize("breakage, message", [(b, m) for _, b, m in BROKEN_DIRS], ids=[i for i, _, _ in BROKEN_DIRS])
def test_load_rejects_broken_dirs_and_leaves_the_model(saved_dir, llama, breakage, message):
    breakage(saved_dir)
    before = snapshot(llama)
    with pytest.raises(RankwiseError) as info:
        load_adapter(llama, saved_dir)
    assert message in str(info.value)
    assert_untouched(llama, before)


def test_load_onto_a_differently_sized_model_is_refused(saved_dir):
    other = make_llama(hidden=48)
    before = snapshot(other)
    with pytest.raises(RankwiseError, match="has weight shape"):
        load_adapter(other, saved_dir)
    assert_untouched(other, before)


def test_shared_tensor_is_saved_once_and_retied(tmp_path, batch):
    model = adapt(make_llama(), "shared-probe", rank=RANK)
    train(model, batch, steps=2)
    save_adapter(model, tmp_path)
    stored = load_file(tmp_path / "rankwise_adapter.safetensors")
    assert sum(key.endswith(".proj") for key in stored) == 1
    config = json.loads((tmp_path / "rankwise_adapter.json").read_text())
    assert len(config["tied"]) == len(config["modules"]) - 1
    loaded = load_adapter(make_llama(), tmp_path)
    projections = {id(layer.proj) for layer in adapter_layers(loaded).values()}
    assert len(projections) == 1


def test_loaded_rewriting_adapter_turns_the_fresh_base_into_the_residual(tmp_path, batch):
    model = adapt(make_llama(), "probe", rank=RANK, data=data_batches())
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_llama(), tmp_path)
    for name, layer in adapter_layers(loaded).items():
        torch.testing.assert_close(layer.base.weight, model.get_submodule(name).base.weight, atol=ATOL, rtol=0)


# ----- statistics collection -----------------------------------------------------------------


def test_covariance_accumulator_known_answer():
    rows = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    acc = CovarianceAccumulator(6)
    for block in rows.split(17):
        acc.update(block)
    assert acc.count == 50
    torch.testing.assert_close(acc.gram, rows.T @ rows)
    torch.testing.assert_close(acc.mean(), rows.mean(0))
    torch.testing.assert_close(acc.second_moment(), rows.T @ rows / 50)
    torch.testing.assert_close(acc.covariance(), torch.cov(rows.T, correction=0), atol=1e-6, rtol=1e-5)


def test_layer_inputs_on_a_known_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    batches = [torch.randn(3, 7, 5), torch.randn(2, 5)]
    first = torch.cat([b.reshape(-1, 5) for b in batches])
    hidden = torch.relu(net[0](first)).detach()
    stats = collect_statistics(net, ["0", "2"], batches, ["input_covariance", "input_batches"])
    torch.testing.assert_close(stats["0"].input_covariance.gram, first.T @ first)
    torch.testing.assert_close(stats["2"].input_covariance.gram, hidden.T @ hidden)
    assert [b.shape for b in stats["0"].input_batches] == [(21, 5), (2, 5)]
    counts = collect_layer_inputs(net, ["2"], batches, lambda m: CovarianceAccumulator(m.in_features))
    assert counts["2"].count == 23


def test_weight_gradients_are_the_batch_mean_and_leave_the_model_alone(llama):
    batches = data_batches()
    name = "model.layers.1.self_attn.q_proj"
    weight = llama.get_submodule(name).weight
    expected = torch.zeros_like(weight)
    for b in batches:
        llama.zero_grad()
        llama(**b).loss.backward()
        expected += weight.grad / len(batches)
    sentinel = torch.ones_like(weight)
    weight.grad = sentinel
    llama.get_submodule("lm_head").weight.requires_grad_(False)
    llama.train()
    grads = collect_weight_gradients(llama, [name], batches)
    torch.testing.assert_close(grads[name], expected)
    assert weight.grad is sentinel
    assert not llama.get_submodule("lm_head").weight.requires_grad
    assert llama.training


def test_unload_restores_the_previous_requires_grad_flags(llama, batch):
    llama.model.embed_tokens.weight.requires_grad_(False)
    adapt(llama, "lora", rank=RANK)
    assert not llama.model.norm.weight.requires_grad
    unload(llama)
    flags = {k: p.requires_grad for k, p in llama.named_parameters()}
    assert flags.pop("model.embed_tokens.weight") is False
    assert all(flags.values())


def test_data_may_be_a_one_shot_generator(llama):
    adapt(llama, "probe", rank=RANK, data=(b for b in data_batches()))
    assert len(adapter_layers(llama)) == 14


def test_tied_weights_are_refused(llama):
    llama.lm_head.weight = llama.model.embed_tokens.weight
    before = snapshot(llama)
    with pytest.raises(RankwiseError, match="'lm_head' is tied to model.embed_tokens.weight"):
        adapt(llama, "lora", rank=RANK, targets=["lm_head", "q_proj"])
    assert_untouched(llama, before)
