"""MoDeGPT's three decompositions on known answers: Nystrom = least squares on the kept channels, CR on
query-key in RoPE pairs (exact when the dropped pairs carry nothing), SVD on value-output = the rank-k optimum;
GQA, the KV cache and densify."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_batch, make_llama
from rankwise.compress import compress
from rankwise.compress.modegpt import CompressedLlamaAttention, CompressedLlamaMLP
from rankwise.densify import densify

DATA = [make_batch(seed=1), make_batch(seed=2)]


def inputs_of(model, name: str) -> torch.Tensor:
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: rows.append(a[0].detach()))
    with torch.no_grad():
        for batch in DATA:
            model(**batch)
    handle.remove()
    return torch.cat(rows).reshape(-1, rows[0].shape[-1]).double()


def test_nystrom_folds_the_least_squares_reconstruction_of_the_dropped_channels_into_down():
    original = make_llama().double()
    model = compress(copy.deepcopy(original), "modegpt", ratio=0.5, data=DATA, parts=("mlp",))
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp, CompressedLlamaMLP) and mlp.intermediate_size == 32
    kept = mlp.kept_channels
    hidden = inputs_of(original, "model.layers.1.mlp.down_proj")  # h = act(gate x) * up x, every channel
    down = original.model.layers[1].mlp.down_proj.weight.detach()
    solution = torch.linalg.lstsq(hidden[:, kept], hidden @ down.T).solution.T
    torch.testing.assert_close(mlp.down_proj.weight.detach(), solution, rtol=1e-6, atol=1e-9)
    assert torch.equal(mlp.gate_proj.weight, original.model.layers[1].mlp.gate_proj.weight[kept])
    # better than dropping the channels and keeping down's columns as they were
    target = hidden @ down.T
    nystrom = (target - hidden[:, kept] @ mlp.down_proj.weight.T).square().sum()
    dropped = (target - hidden[:, kept] @ down[:, kept].T).square().sum()
    assert nystrom < dropped


def llama_with_silent_pairs(kv_heads: int = 4):
    """A LLaMA whose query and key rows of RoPE pairs 1 and 3 (dims 1, 5 and 3, 7 of each 8-dim head) are zero."""
    model = make_llama().double()
    if kv_heads != 4:
        from transformers import LlamaForCausalLM

        config = copy.deepcopy(model.config)
        config.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                rows = proj.weight.view(-1, 8, proj.in_features)
                rows[:, [1, 5, 3, 7]] = 0
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_query_key_pairs_are_kept_whole_with_their_own_rope_frequencies(kv_heads):
    original = llama_with_silent_pairs(kv_heads)
    batch = make_batch(seed=5)
    with torch.no_grad():
        expected = original(**batch).logits
    model = compress(copy.deepcopy(original), "modegpt", ratio=0.5, data=DATA, parts=("qk",))
    attention = model.model.layers[0].self_attn
    assert isinstance(attention, CompressedLlamaAttention) and attention.qk_dim == 4 and attention.value_dim == 8
    assert attention.rope_index.tolist() == [[0, 2, 4, 6]] * kv_heads  # pairs (0, 4) and (2, 6), kept whole
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-9, atol=1e-9)


def test_value_output_reaches_the_rank_k_optimum_of_the_head_map():
    original = make_llama().double()
    model = compress(copy.deepcopy(original), "modegpt", ratio=0.5, data=DATA, parts=("vo",))
    attention, source = model.model.layers[0].self_attn, original.model.layers[0].self_attn
    x = inputs_of(original, "model.layers.0.self_attn.v_proj")
    gram = x.T @ x
    d, k = 8, attention.value_dim
    for head in range(4):  # one value head per query head here
        exact = source.o_proj.weight[:, head * d:(head + 1) * d] @ source.v_proj.weight[head * d:(head + 1) * d]
        approx = attention.o_proj.weight[:, head * k:(head + 1) * k] @ attention.v_proj.weight[head * k:(head + 1) * k]
        delta = (exact - approx).detach()
        error = float(((delta @ gram) * delta).sum())
        tail = torch.linalg.eigvalsh(exact.detach() @ gram @ exact.detach().T).flip(0)[k:].clamp_min(0).sum()
        assert error == pytest.approx(float(tail), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_compressed_blocks_generate_with_the_cache_and_densify_exactly(kv_heads):
    from transformers import LlamaForCausalLM

    config = make_llama().config
    config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    compress(model, "modegpt", ratio=0.5, data=DATA)
    assert model.rankwise_compression["realised_ratio"] == 0.5
    plain = densify(copy.deepcopy(model))
    assert type(plain.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert type(plain.model.layers[0].mlp).__name__ == "LlamaMLP"
    batch = make_batch(seed=3)
    prompt = batch["input_ids"][:1, :6]
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(plain.generate(prompt, max_new_tokens=6, do_sample=False), generated)
        # the cached generation is the argmax of the full forward at every step
        logits = model(input_ids=generated[:, :-1]).logits
        assert torch.equal(logits[0, 5:].argmax(-1), generated[0, 6:])
