"""Diagnostics along training and of representations: gradient ranks (rankwise loop and the
transformers Trainer), the Matrix Nuclear-Norm of final hidden states."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_batch
from rankwise.analyze import GradientRankCallback, matrix_nuclear_norm
from rankwise.analyze.representations import nuclear_norm_proxy
from rankwise.errors import RankwiseError
from rankwise.training import TrainingHooks, train


class GradientCopies(TrainingHooks):
    """The oracle: clones every Linear weight's gradient after each step."""

    def __init__(self):
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def after_step(self, model, *, step, total_steps, optimizer):
        self.grads[step] = {n: m.weight.grad.clone() for n, m in model.named_modules()
                            if isinstance(m, nn.Linear) and m.weight.grad is not None}


def stable_rank_by_hand(grad: torch.Tensor) -> float:
    s = torch.linalg.svdvals(grad.double())
    return float((s**2).sum() / s[0] ** 2)


def batches(seed=0):
    return (make_batch(seed + k) for k in itertools.count())


def test_gradient_ranks_along_the_rankwise_loop(llama):
    callback, oracle = GradientRankCallback(every=2), GradientCopies()
    optimizer = torch.optim.AdamW(llama.parameters(), lr=1e-3)
    train(llama, optimizer, batches(), steps=5, hooks=[callback, oracle])
    layers = [n for n, m in llama.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert sorted({r["step"] for r in callback.records}) == [1, 2, 4]
    assert len(callback.records) == 3 * len(layers) == 3 * 14
    for row in callback.records:
        grad = oracle.grads[row["step"]][row["layer"]]
        assert row["shape"] == list(grad.shape)
        assert row["stable_rank"] == pytest.approx(stable_rank_by_hand(grad), rel=1e-4)
        assert row["frobenius_norm"] == pytest.approx(float(grad.norm()), rel=1e-5)
        assert 1 <= row["effective_rank"] <= min(grad.shape) + 1e-3
    summary = {row["layer"]: row for row in callback.summary()}
    assert set(summary) == set(layers)
    q0 = summary["model.layers.0.self_attn.q_proj"]
    assert (q0["first_step"], q0["last_step"]) == (1, 4)
    assert "model.layers.0.self_attn.q_proj" in callback.format_summary()


class OneLinear(nn.Module):
    """y = W x on a few tokens; loss = sum(y * target): its weight gradient is target^T x, rank <= tokens."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 16, bias=False)

    def forward(self, x, target):
        return SimpleNamespace(loss=(self.proj(x) * target).sum())


@pytest.mark.parametrize("tokens", [1, 3])
def test_a_gradient_from_t_tokens_has_rank_t(tokens):
    gen = torch.Generator().manual_seed(tokens)
    model = OneLinear()
    data = iter([{"x": torch.randn(tokens, 24, generator=gen), "target": torch.randn(tokens, 16, generator=gen)}])
    callback = GradientRankCallback(every=1, targets=["proj"])
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), data, steps=1, hooks=[callback])
    (row,) = callback.records
    if tokens == 1:
        assert row["stable_rank"] == pytest.approx(1.0, rel=1e-6)
        assert row["effective_rank"] == pytest.approx(1.0, abs=1e-4)
    else:
        assert 1 < row["stable_rank"] <= tokens and row["effective_rank"] <= tokens + 1e-3


def test_gradient_ranks_in_the_transformers_trainer(llama, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Copies(TrainerCallback):
        def __init__(self):
            self.grads = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads[state.global_step + 1] = {n: m.weight.grad.clone() for n, m in model.named_modules()
                                                 if isinstance(m, nn.Linear) and n != "lm_head"}

    data = [{"input_ids": make_batch(k, batch=1)["input_ids"][0], "labels": make_batch(k, batch=1)["labels"][0]}
            for k in range(8)]
    callback, oracle = GradientRankCallback(every=2, targets=["q_proj", "down_proj"]), Copies()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_num_workers=0)
    Trainer(model=llama, args=args, train_dataset=data, callbacks=[callback, oracle]).train()
    assert sorted({r["step"] for r in callback.records}) == [1, 2, 4]
    assert {r["layer"] for r in callback.records} == {f"model.layers.{i}.{p}" for i in range(2)
                                                      for p in ("self_attn.q_proj", "mlp.down_proj")}
    for row in callback.records:
        grad = oracle.grads[row["step"]][row["layer"]]
        assert row["stable_rank"] == pytest.approx(stable_rank_by_hand(grad), rel=1e-4)


def test_gradient_rank_callback_says_when_there_is_no_gradient(llama, tmp_path):
    for p in llama.parameters():
        p.requires_grad_(False)
    llama.lm_head.weight.requires_grad_(True)  # only the head trains: all-linear leaves it out
    callback = GradientRankCallback(every=3)
    with pytest.raises(RankwiseError, match="no layer selected by targets 'all-linear' has a non-zero gradient "
                                            "at step 1"):
        train(llama, torch.optim.SGD([llama.lm_head.weight], lr=0.1), batches(), steps=2, hooks=[callback])
    with pytest.raises(RankwiseError, match="every must be a positive integer"):
        GradientRankCallback(every=0)
    saved = GradientRankCallback(every=2).save(tmp_path / "g" / "gradient_rank.json")
    assert json.loads(saved.read_text()) == {"every": 2, "records": [], "summary": []}


# ----- Matrix Nuclear-Norm -------------------------------------------------------------------------


def test_nuclear_norm_proxy_known_answer():
    hidden = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [2.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    means = [sum(row[j] for row in hidden.tolist()) / 4 for j in range(3)]
    centred = [[row[j] - means[j] for j in range(3)] for row in hidden.tolist()]
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in centred]
    column_norms = sorted((math.sqrt(sum(row[j] ** 2 for row in rows)) for j in range(3)), reverse=True)
    result = nuclear_norm_proxy(hidden)
    assert result.score == pytest.approx(sum(column_norms[:3]), rel=1e-12)  # D = min(4, 3) = 3: every column
    assert result.nuclear_norm <= result.score + 1e-12  # ||A||_* <= sum of column norms
    assert (result.num_tokens, result.hidden_size) == (4, 3) and float(result) == result.score
    wide = hidden.T.tolist()  # 3 tokens x 4 dims: D = min(3, 4), the 3 largest of the 4 column norms
    means = [sum(row[j] for row in wide) / 3 for j in range(4)]
    centred = [[row[j] - means[j] for j in range(4)] for row in wide]
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in centred]
    column_norms = sorted((math.sqrt(sum(row[j] ** 2 for row in rows)) for j in range(4)), reverse=True)
    assert nuclear_norm_proxy(hidden.T).score == pytest.approx(sum(column_norms[:3]), rel=1e-12)
    with pytest.raises(RankwiseError, match="centred representation is zero"):
        nuclear_norm_proxy(torch.ones(3, 4))


def test_matrix_nuclear_norm_of_an_encoder_on_text(minilm, minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = ["Low rank makes large models cheap to train.", "The cat sat on the mat, quite still."]
    result = matrix_nuclear_norm(minilm, texts, tokenizer=tokenizer)
    with torch.no_grad():
        hidden = torch.cat([minilm(**tokenizer(t, add_special_tokens=False, return_tensors="pt")).last_hidden_state[0]
                            for t in texts])
    assert result.num_tokens == hidden.shape[0] and result.hidden_size == 384
    assert result.score == pytest.approx(nuclear_norm_proxy(hidden).score, rel=1e-5)
    # N = 19 < d = 384: the score sums only the 19 largest column norms (measured 7.9 against an
    # exact nuclear norm of 16.7): the proxy is a ranking score, not an estimate of ||A||_* here
    assert result.score < result.nuclear_norm
    with pytest.raises(RankwiseError, match="non-empty list"):
        matrix_nuclear_norm(minilm, "one string", tokenizer=tokenizer)


def test_matrix_nuclear_norm_of_a_causal_lm_uses_the_final_normed_states(llama):
    ids = [torch.arange(3, 20), torch.arange(40, 60)]
    with torch.no_grad():
        hidden = torch.cat([llama.model(input_ids=i.unsqueeze(0)).last_hidden_state[0] for i in ids])
    assert matrix_nuclear_norm(llama, ids).score == pytest.approx(nuclear_norm_proxy(hidden).score, rel=1e-5)
    assert matrix_nuclear_norm(llama, ids, max_length=5).num_tokens == 10
