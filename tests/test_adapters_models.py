"""The common adapter suite's invariants for every row on the two other bases people have:
a tiny GPT-2 (transformers Conv1D layers, weights stored in x out, head tied to the embedding)
and the real pretrained all-MiniLM-L6-v2 encoder (targets ``query``, ``value``, ``dense`` --
``pooler.dense`` sees one row per sequence -- and no loss of its own: a ``loss_fn``).

tests/test_adapters.py runs the full table on the tiny LLaMA; here ONE test per (row, GPT-2) and
per (method, MiniLM) -- the first row of each method --
builds the adapter once and checks, in order: output at init (equal to the base's, or not, as
the row promises), gradients on exactly the adapter parameters, a lower loss after 5 Adam steps
with every frozen tensor unchanged, merge / unmerge equality, the original weight recovered,
a save / load roundtrip onto a fresh base, and unload. Models are built once per module and
copied, so the two bases add about as much time as the LLaMA table.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cases import AdapterCase, collect
from conftest import make_batch, make_gpt2
from rankwise.adapters import ADAPTERS, adapt, adapter_layers, load_adapter, merge, save_adapter, trainable_parameters, unload, unmerge
from rankwise.errors import RankwiseError
from rankwise.layers import dense_weight
from rankwise.targets import match_targets

RANK, ALPHA = 4, 8.0
CASES = collect("adapters_")
#: the first row of every method (MiniLM is 1000x the tiny models: every method, not every variant)
FIRST_ROWS = list({case.method: case for case in reversed(CASES)}.values())[::-1]
# the MiniLM rows take 1-3 s each (the SVD / QR / LU inits of 31 layers of 384 x 1536): marked slow
ROWS = ([pytest.param(case, "gpt2", id=f"gpt2-{case.id}") for case in CASES]
        + [pytest.param(case, "minilm", id=f"minilm-{case.id}", marks=pytest.mark.slow) for case in FIRST_ROWS])
rows = pytest.mark.parametrize("case, base", ROWS, indirect=["base"])
MINILM_TARGETS = ["query", "value", "dense"]


def encoder_loss(model, batch):
    """A loss for an encoder without one: the squared hidden states and pooled output (reaches every target)."""
    out = model(**batch)
    return out.last_hidden_state.square().mean() + out.pooler_output.square().mean()


def minilm_batch(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (2, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class Base:
    """One base model family: how to build it, run it, score it and feed data-driven inits."""

    def __init__(self, name, template, targets, batch, data, loss_fn):
        self.name, self.template, self.targets = name, template, targets
        self.batch, self.data, self.loss_fn = batch, data, loss_fn
        self.names = match_targets(template, targets)
        self.weights = {n: dense_weight(template.get_submodule(n), torch.float32).clone() for n in self.names}
        self.reference = self.output(template)

    def fresh(self):
        return copy.deepcopy(self.template)

    def output(self, model) -> torch.Tensor:
        with torch.no_grad():
            out = model(**self.batch)
        return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state

    def loss(self, model) -> torch.Tensor:
        return model(**self.batch).loss if self.loss_fn is None else self.loss_fn(model, self.batch)

    def adapt(self, case: AdapterCase, model=None):
        model = self.fresh() if model is None else model
        extra = {}
        if case.needs_data:
            extra["data"] = self.data
            if self.loss_fn is not None and "weight_gradient" in ADAPTERS.get(case.method).statistics:
                extra["loss_fn"] = self.loss_fn
        return adapt(model, case.method, rank=RANK, alpha=ALPHA, targets=self.targets, **case.options, **extra)


@pytest.fixture(scope="module")
def gpt2_base():
    return Base("gpt2", make_gpt2(), "all-linear", make_batch(), [make_batch(seed=1), make_batch(seed=2)], None)


@pytest.fixture(scope="module")
def minilm_base(minilm_path):
    from transformers import AutoModel

    template = AutoModel.from_pretrained(minilm_path).eval()
    return Base("minilm", template, MINILM_TARGETS, minilm_batch(0), [minilm_batch(s) for s in (1, 2, 3)],
                encoder_loss)


@pytest.fixture
def base(request):
    return request.getfixturevalue(f"{request.param}_base")


def _snapshot_frozen(model):
    return {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}


@rows
def test_every_method_on_gpt2_and_minilm(case, base, tmp_path):
    reference = base.reference
    model = base.adapt(case)
    layers = adapter_layers(model)
    assert sorted(layers) == sorted(base.names)
    expected_count = case.shared_trainable(RANK) + sum(
        case.trainable_per_layer(w.shape[1], w.shape[0], RANK) for w in base.weights.values())
    assert trainable_parameters(model) == expected_count

    out = base.output(model)
    if case.identity_at_init:
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=0)
    else:
        assert not torch.allclose(out, reference, atol=2e-5)

    model.train()
    base.loss(model).backward()
    adapter_ids = {id(p) for layer in layers.values() for k, p in layer.named_parameters() if not k.startswith("base.")}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in adapter_ids), name

    frozen = _snapshot_frozen(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=case.lr)
    model.eval()
    with torch.no_grad():
        start = base.loss(model).item()  # in eval mode: BERT's dropout would make the comparison noisy
    torch.manual_seed(0)
    for _ in range(5):
        model.train()
        optimizer.zero_grad()
        base.loss(model).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        end = base.loss(model).item()
    assert end < start, (start, end)
    for key, p in model.named_parameters():
        if key in frozen:
            assert torch.equal(p, frozen[key]), key

    trained = base.output(model)
    tolerance = 1e-4 * max(1.0, trained.abs().max().item())
    if case.quantizes_base:
        with pytest.raises(RankwiseError, match="allow_lossy=True"):
            merge(model)
    else:
        merge(model)
        torch.testing.assert_close(base.output(model), trained, atol=tolerance, rtol=0)
        for name, layer in adapter_layers(model).items():
            torch.testing.assert_close(layer.original_weight(), base.weights[name], atol=1e-5, rtol=0)
        unmerge(model)
        torch.testing.assert_close(base.output(model), trained, atol=tolerance, rtol=0)

    save_adapter(model, tmp_path)
    loaded = load_adapter(base.fresh(), tmp_path)
    torch.testing.assert_close(base.output(loaded), trained, atol=tolerance, rtol=0)
    if not case.quantizes_base:
        plain = unload(loaded)
        assert not adapter_layers(plain)
        torch.testing.assert_close(base.output(plain), trained, atol=tolerance, rtol=0)


def test_gpt2_tied_head_is_refused_and_left_alone(gpt2_base):
    model = gpt2_base.fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=r"'transformer.wte' is tied to lm_head.weight"):
        adapt(model, "lora", rank=RANK, targets=["wte", "c_attn"])
    with pytest.raises(RankwiseError, match=r"'lm_head' is tied to transformer.wte.weight"):
        adapt(model, "lora", rank=RANK, targets=["lm_head"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not adapter_layers(model)
