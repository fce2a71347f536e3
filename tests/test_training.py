"""The training loop: learning, evaluation, schedule, history, timing and exact memory accounting."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_batch, make_llama
from rankwise.data.batches import TokenBatches, embedded_data
from rankwise.data.models import build_model
from rankwise.errors import RankwiseError
from rankwise.training import MemoryTracker, TrainingHooks, TrainResult, cosine_schedule, evaluate, train

# Single-threaded: fast and stable when other processes share the cores (see conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


FLOAT = 4  # bytes per fp32 element


class Regressor(nn.Module):
    """One Linear with a squared-error loss, called like a causal LM: ``model(**batch).loss``."""

    def __init__(self, n_in: int = 4, n_out: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=((self.linear(input_ids) - labels) ** 2).mean())


def _regression_batches(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield {"input_ids": torch.randn(batch, 4, generator=generator), "labels": torch.randn(batch, 3, generator=generator)}


def _random_tokens(n=4000, vocab=128, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_training_the_tiny_preset_lowers_the_validation_loss(rankwise_cache):
    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    batches, validation = embedded_data("finetune", batch_size=8, seq_len=64, seed=0, eval_batches=4)
    before = evaluate(model, validation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    result = train(model, optimizer, batches, steps=30, eval_batches=validation, eval_every=15, max_grad_norm=1.0)
    assert isinstance(result, TrainResult) and result.steps == 30
    assert before > math.log(4096) - 0.5  # random init: about uniform over the vocabulary
    assert result.final_val_loss < before - 1.5
    assert result.final_val_ppl == pytest.approx(math.exp(result.final_val_loss))
    assert [row["step"] for row in result.history if "val_loss" in row] == [15, 30]
    assert result.history[-1]["val_loss"] == result.final_val_loss
    assert result.ms_per_step > 0 and result.peak_memory_mb > 0


def test_memory_tracker_counts_exact_bytes_of_a_linear_step():
    """Linear(4 -> 3), batch 8, loss = mean((xW^T + b)^2), SGD without momentum.

    Saved for backward: x (to form dW; W^T is a view of W and counts once) and y (for the
    square): 8*4 + 8*3 floats. Before backward: params (12 + 3) + x + y; before step: params +
    grads (15 + 15). SGD keeps no state.
    """
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    tracker = MemoryTracker(linear, optimizer)
    x = torch.randn(8, 4)
    with tracker.saving_activations():
        loss = linear(x).pow(2).mean()
    assert tracker.sample() == (15 + 8 * 4 + 8 * 3) * FLOAT
    loss.backward()
    tracker.clear_activations()
    assert tracker.sample() == (15 + 15) * FLOAT
    optimizer.step()
    assert tracker.sample() == 30 * FLOAT
    assert tracker.peak_bytes == (15 + 8 * 4 + 8 * 3) * FLOAT


def test_train_reports_the_exact_peak_with_adamw_state():
    """Through ``train``: AdamW state per parameter = exp_avg + exp_avg_sq + a float32 step.

    From step 2 on, just before backward: params 15 + state (2*15 + 2) + saved x (8*4) and
    the residual (8*3) = 15 + 32 + 32 + 24 floats; gradients are None then (set_to_none).
    Just before the step: params + grads + state = 15 + 15 + 32 floats, which is smaller.
    """
    model = Regressor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    result = train(model, optimizer, _regression_batches(8), steps=3)
    assert result.peak_memory_mb * 2**20 == (15 + 32 + 8 * 4 + 8 * 3) * FLOAT


def test_peak_memory_grows_with_the_batch():
    peaks = []
    for batch_size in (4, 8):
        model = make_llama()
        batches = TokenBatches(_random_tokens(), batch_size=batch_size, seq_len=16)
        result = train(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches, steps=2)
        peaks.append(result.peak_memory_mb)
    parameters_and_state = 3 * sum(p.numel() for p in make_llama().parameters()) * FLOAT / 2**20
    assert peaks[0] > parameters_and_state  # activations are on top of weights + moments
    assert peaks[1] > peaks[0] + 0.9 * (peaks[0] - parameters_and_state)  # activations ~double


def test_history_logging_evaluation_and_progress():
    model = make_llama()
    batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16, seed=1)
    validation = [make_batch(seed=9)]
    calls = []
    bar = SimpleNamespace(updates=0, postfix=None)
    bar.update = lambda n: setattr(bar, "updates", bar.updates + n)
    bar.set_postfix = lambda values, refresh=False: setattr(bar, "postfix", values)
    result = train(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, steps=10,
                   eval_batches=validation, eval_every=5, log_every=4, progress=bar)
    assert [row["step"] for row in result.history] == [4, 5, 8, 10]
    assert ["val_loss" in row for row in result.history] == [False, True, False, True]
    assert bar.updates == 10 and "train_loss" in bar.postfix

    model = make_llama()
    batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16, seed=1)
    result_every = train(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, steps=10,
                         progress=lambda step, metrics: calls.append((step, metrics["train_loss"])))
    # Same seed, same data: the log_every rows are means of the per-step losses.
    per_step = [row["train_loss"] for row in result_every.history]
    assert [step for step, _ in calls] == list(range(1, 11))
    assert result.history[0]["train_loss"] == pytest.approx(sum(per_step[:4]) / 4)
    assert result.history[1]["train_loss"] == pytest.approx(per_step[4])
    assert result_every.final_val_loss is None and result_every.final_val_ppl is None


class Shrink(TrainingHooks):
    """A loss term ``weight * ||lm_head||_F^2``; records the head each time the loop asks for it."""

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.seen: list[torch.Tensor] = []

    def loss_term(self, model):
        self.seen.append(model.lm_head.weight.detach().clone())
        return self.weight * model.lm_head.weight.pow(2).sum()


class StepRecorder(TrainingHooks):
    """No loss term (the default); records every after_step call and the head at that moment."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, object, torch.Tensor]] = []

    def after_step(self, model, *, step, total_steps, optimizer):
        self.calls.append((step, total_steps, optimizer, model.lm_head.weight.detach().clone()))


def test_hooks_add_their_loss_terms_and_run_after_every_optimizer_step():
    model = make_llama()
    batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    first, second, recorder = Shrink(0.25), Shrink(0.25), StepRecorder()
    before = model.lm_head.weight.norm().item()
    result = train(model, optimizer, batches, steps=3, hooks=[first, recorder, second])
    # the two terms are summed: 0.5 ||W||^2 at the first step
    assert result.history[0]["regularizer"] == pytest.approx(0.5 * before**2, rel=1e-5)
    # d/dW of 0.5 ||W||^2 is W: each SGD step multiplies the head by (1 - 0.5) plus the task gradient
    assert model.lm_head.weight.norm().item() < 0.5 * before
    assert [(step, total, opt) for step, total, opt, _ in recorder.calls] == [(1, 3, optimizer), (2, 3, optimizer), (3, 3, optimizer)]
    # after_step sees the weights the step just wrote: the next loss term reads exactly them
    for (_, _, _, after), next_seen in zip(recorder.calls, first.seen[1:]):
        torch.testing.assert_close(after, next_seen, rtol=0, atol=0)
    assert not torch.equal(recorder.calls[0][3], first.seen[0])


def test_a_run_without_loss_terms_records_no_regularizer():
    model = make_llama()
    batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16)
    result = train(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, steps=2, hooks=[StepRecorder()])
    assert all("regularizer" not in row for row in result.history)


def test_non_finite_loss_names_the_step_and_stops_before_updating():
    model = make_llama()
    batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []

    class ExplodeAtThirdStep(TrainingHooks):
        def loss_term(self, module):
            snapshots.append({k: v.clone() for k, v in module.state_dict().items()})
            return torch.tensor(float("nan")) if len(snapshots) == 3 else None

    with pytest.raises(RankwiseError, match="at step 3"):
        train(model, optimizer, batches, steps=5, hooks=[ExplodeAtThirdStep()])
    assert all(torch.equal(v, snapshots[-1][k]) for k, v in model.state_dict().items())
    assert model.training is False  # mode restored (make_llama returns it in eval mode)


def test_evaluate_weights_batches_by_tokens_and_restores_the_mode():
    model = make_llama()
    model.train()
    big, small = make_batch(seed=1, batch=3, seq=16), make_batch(seed=2, batch=1, seq=16)
    together = evaluate(model, [big, small])
    expected = (3 * evaluate(model, [big]) + 1 * evaluate(model, [small])) / 4
    assert together == pytest.approx(expected, rel=1e-6)
    assert model.training
    with pytest.raises(RankwiseError, match="no evaluation batches"):
        evaluate(model, [])


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = cosine_schedule(optimizer, warmup_steps=4, total_steps=14, min_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    with pytest.raises(RankwiseError, match="warmup_steps"):
        cosine_schedule(optimizer, warmup_steps=20, total_steps=10)
    with pytest.raises(RankwiseError, match="min_ratio"):
        cosine_schedule(optimizer, warmup_steps=0, total_steps=10, min_ratio=2.0)


def test_train_follows_the_scheduler_in_its_history():
    model = make_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = cosine_schedule(optimizer, warmup_steps=2, total_steps=4, min_ratio=0.0)
    batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16)
    result = train(model, optimizer, batches, steps=4, scheduler=scheduler)
    # The lr recorded for a step is the one for the next step (after scheduler.step()).
    assert [row["lr"] for row in result.history] == pytest.approx([0.2, 0.2, 0.1, 0.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": 2, "eval_every": 1}, "eval_every needs eval_batches"),
        ({"steps": 2, "log_every": 0}, "log_every must be a positive integer"),
        ({"steps": 2, "max_grad_norm": 0.0}, "max_grad_norm must be positive"),
    ],
)
def test_train_rejects_bad_arguments_before_touching_the_model(kwargs, message):
    model = make_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16)
    with pytest.raises(RankwiseError, match=message):
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), batches, **kwargs)
    assert batches.batches_drawn == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_loop_averages_micro_batches_for_an_accumulating_layerwise_optimizer():
    import copy

    from conftest import make_batch, make_llama
    from rankwise import optim
    from rankwise.training import train

    first, second = make_batch(seed=1), make_batch(seed=2)
    accumulated = make_llama()
    reference = copy.deepcopy(accumulated)
    opt = optim.build(accumulated, "galore", lr=1e-2, rank=4, update_proj_gap=5, layerwise=True, accumulation_steps=2)
    train(accumulated, opt, iter([first, second]), steps=2)
    full = {k: torch.cat([first[k], second[k]]) for k in first}
    train(reference, optim.build(reference, "galore", lr=1e-2, rank=4, update_proj_gap=5), iter([full]), steps=1)
    for (name, a), b in zip(accumulated.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


# ----- gradient checkpointing, bf16 autocast, objectives, save and resume ----------------------

import copy  # noqa: E402

from rankwise import optim  # noqa: E402
from rankwise.adapters import ADAPTERS  # noqa: E402
from rankwise.bench.kinds import prepare  # noqa: E402
from rankwise.bench.setup import SetUp  # noqa: E402
from rankwise.bench.suites import SUITES  # noqa: E402
from rankwise.training import (  # noqa: E402
    CAUSAL_LM,
    MASKED_LM,
    hidden_state_fidelity,
    load_training_state,
    save_training_state,
)

#: the finetune suite's row of each adapter method (its options), rank capped for the fixture
ADAPTER_SETUPS = {}
for _setup in SUITES["finetune"]:
    if _setup.kind == "adapter" and _setup.method not in ADAPTER_SETUPS:
        ADAPTER_SETUPS[_setup.method] = SetUp(**{**_setup.__dict__, "rank": min(_setup.rank or 4, 4),
                                                 "options": {k: v for k, v in _setup.options.items()
                                                             if k not in ("target_r", "init_r")}})


def _setup_of(method: str) -> SetUp:
    return ADAPTER_SETUPS.get(method, SetUp(method, "adapter", method, lr=1e-3, rank=4))


def _two_runs(make, steps=2, **train_kwargs):
    """The same prepared model trained twice from the same state: plainly, then with ``train_kwargs``."""
    results = []
    for kwargs in ({}, train_kwargs):
        model, optimizer, hooks = make()
        batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16, seed=3)
        torch.manual_seed(7)
        result = train(model, optimizer, batches, steps=steps, hooks=hooks, **kwargs)
        results.append((model, result))
    return results


def _adapted(method):
    def make():
        model = make_llama()
        data = TokenBatches(_random_tokens(seed=1), batch_size=2, seq_len=16, seed=5)
        torch.manual_seed(0)
        prepared = prepare(_setup_of(method), model, 32, data, 2)
        return model, prepared.optimizer, prepared.hooks
    return make


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", ADAPTERS.names())
def test_gradient_checkpointing_gives_every_adapter_the_same_steps_with_less_memory(method, use_reentrant):
    (plain, plain_result), (checkpointed, result) = _two_runs(
        _adapted(method), gradient_checkpointing=True, use_reentrant=use_reentrant)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert [r["train_loss"] for r in result.history] == pytest.approx([r["train_loss"] for r in plain_result.history],
                                                                      abs=1e-6)
    assert result.peak_memory_mb < plain_result.peak_memory_mb
    assert not checkpointed.is_gradient_checkpointing  # switched off again after the run


def _optimizer_run(name, layerwise):
    def make():
        model = make_llama()
        if name == "lora_pro":
            import rankwise

            rankwise.adapt(model, "lora", rank=4)
        options = {"rank": 4} if "rank" in optim.method_options(name) and name != "frugal" else {}
        return model, optim.build(model, name, lr=1e-3, layerwise=layerwise, **options), ()
    return make


OPTIMIZER_MODES = [(name, False) for name in optim.names()] + [
    (entry.name, True) for entry in optim.OPTIMIZERS.entries() if "layerwise" in entry.supports]


@pytest.mark.parametrize("name, layerwise", OPTIMIZER_MODES,
                         ids=[f"{n}{'-layerwise' if lw else ''}" for n, lw in OPTIMIZER_MODES])
def test_gradient_checkpointing_gives_every_optimizer_the_same_steps(name, layerwise):
    (plain, _), (checkpointed, _) = _two_runs(_optimizer_run(name, layerwise), gradient_checkpointing=True,
                                              use_reentrant=True)
    for (param_name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=param_name)


def test_gradient_checkpointing_needs_a_model_that_supports_it():
    model = Regressor()
    with pytest.raises(RankwiseError, match="gradient checkpointing needs a transformers model"):
        train(model, torch.optim.SGD(model.parameters(), lr=0.1), _regression_batches(2), steps=1,
              gradient_checkpointing=True)


def test_bf16_autocast_keeps_fp32_master_weights_and_tracks_the_fp32_loss():
    (fp32, fp32_result), (mixed, mixed_result) = _two_runs(
        lambda: (lambda m: (m, torch.optim.AdamW(m.parameters(), lr=1e-3), ()))(make_llama()), steps=3,
        autocast_dtype=torch.bfloat16)
    # fp32 master weights: parameters and their gradients stay fp32 under autocast
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in mixed.parameters())
    losses = [r["train_loss"] for r in fp32_result.history]
    mixed_losses = [r["train_loss"] for r in mixed_result.history]
    # bf16 keeps 8 bits of mantissa: the loss (about ln 128 = 4.85) agrees to a few 1e-2, not exactly
    assert mixed_losses == pytest.approx(losses, abs=5e-2) and mixed_losses != losses
    batch = make_batch(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mixed(**batch).logits.dtype == torch.bfloat16
    assert evaluate(mixed, [batch], autocast_dtype=torch.bfloat16) == pytest.approx(evaluate(mixed, [batch]), abs=5e-2)
    with pytest.raises(RankwiseError, match="autocast_dtype must be a torch.dtype"):
        train(fp32, torch.optim.SGD(fp32.parameters(), lr=0.1), iter([batch]), steps=1, autocast_dtype="bf16")


def test_train_measures_the_loss_before_the_first_step():
    model = make_llama()
    validation = [make_batch(seed=9)]
    before = evaluate(model, validation)
    result = train(model, torch.optim.SGD(model.parameters(), lr=0.5), TokenBatches(_random_tokens(), batch_size=2,
                   seq_len=16), steps=2, eval_batches=validation)
    assert result.initial_val_loss == before and result.final_val_loss != before


def test_masked_lm_objective_weights_batches_by_their_masked_tokens():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32)).eval()
    ids = torch.randint(5, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    few = {"input_ids": ids, "labels": torch.full_like(ids, -100)}
    few["labels"][0, 3] = ids[0, 3]
    many = {"input_ids": ids, "labels": ids.clone()}
    weighted = evaluate(model, [few, many], objective=MASKED_LM)
    expected = (1 * evaluate(model, [few], objective=MASKED_LM) + 24 * evaluate(model, [many], objective=MASKED_LM)) / 25
    assert weighted == pytest.approx(expected, rel=1e-6)
    assert MASKED_LM.tokens(few) == 1 and CAUSAL_LM.tokens(many) == 22


def test_hidden_state_fidelity_is_zero_for_the_teacher_on_unmasked_input_and_trains_an_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0))
    objective = hidden_state_fidelity(copy.deepcopy(encoder))
    assert not objective.perplexity
    ids = torch.randint(5, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    unmasked = {"input_ids": ids, "labels": torch.where(chosen, ids, torch.full_like(ids, -100))}
    assert evaluate(encoder, [unmasked], objective=objective) == pytest.approx(0.0, abs=1e-10)
    masked = {"input_ids": torch.where(chosen, torch.full_like(ids, 4), ids), "labels": unmasked["labels"]}
    # known answer: the mean squared difference of the layer-normalised states at the masked positions
    with torch.no_grad():
        h = encoder(input_ids=masked["input_ids"]).last_hidden_state[chosen]
        h0 = encoder(input_ids=ids).last_hidden_state[chosen]
        norm = torch.nn.functional.layer_norm
        expected = ((norm(h, (32,)) - norm(h0, (32,))) ** 2).mean().item()
    before = evaluate(encoder, [masked], objective=objective)
    assert before == pytest.approx(expected, rel=1e-5) and before > 0.01
    result = train(encoder, torch.optim.AdamW(encoder.parameters(), lr=3e-3), iter([masked] * 30), steps=30,
                   objective=objective, eval_batches=[masked])
    assert result.final_val_loss < 0.5 * before and result.final_val_ppl is None
    with pytest.raises(RankwiseError, match="computed no loss"):
        evaluate(encoder, [masked])


def _resumable(method: str | None):
    model = make_llama()
    torch.manual_seed(0)
    if method is None:
        optimizer = optim.build(model, "galore", lr=1e-2, rank=4, update_proj_gap=2)
        hooks = ()
    else:
        data = TokenBatches(_random_tokens(seed=1), batch_size=2, seq_len=16, seed=5)
        prepared = prepare(_setup_of(method), model, 32, data, 6)
        optimizer, hooks = prepared.optimizer, prepared.hooks
    scheduler = cosine_schedule(optimizer, warmup_steps=2, total_steps=6)
    batches = TokenBatches(_random_tokens(), batch_size=2, seq_len=16, seed=3)
    return model, optimizer, scheduler, batches, hooks


@pytest.mark.parametrize("method", [None, *ADAPTERS.names()], ids=lambda m: m or "galore")
def test_a_resumed_run_computes_exactly_what_the_uninterrupted_run_computes(method, tmp_path):
    model, optimizer, scheduler, batches, hooks = _resumable(method)
    torch.manual_seed(11)
    straight = train(model, optimizer, batches, steps=6, scheduler=scheduler, hooks=hooks)

    first = _resumable(method)
    torch.manual_seed(11)

    def save(step, so_far):
        save_training_state(tmp_path / f"checkpoint-{step}", model=first[0], optimizer=first[1], scheduler=first[2],
                            batches=first[3], step=step, history=so_far.history, info={"run": "test"},
                            hooks=first[4])

    train(first[0], first[1], first[3], steps=6, scheduler=first[2], hooks=first[4], save_every=3, save=save)
    torch.manual_seed(999)  # the saved RNG state, not this one, drives what follows
    resumed_model, resumed_optimizer, resumed_scheduler, resumed_batches, resumed_hooks = _resumable(method)
    state = load_training_state(tmp_path / "checkpoint-3", model=resumed_model, optimizer=resumed_optimizer,
                                scheduler=resumed_scheduler, batches=resumed_batches, hooks=resumed_hooks)
    assert state["step"] == 3 and state["info"] == {"run": "test"} and len(state["history"]) == 3
    rest = train(resumed_model, resumed_optimizer, resumed_batches, steps=6, scheduler=resumed_scheduler,
                 hooks=resumed_hooks, start_step=3)
    assert [r["step"] for r in rest.history] == [4, 5, 6]
    assert state["history"] + rest.history == straight.history
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_from_another_model_or_optimizer_is_refused_untouched(tmp_path):
    model, optimizer, scheduler, batches, _ = _resumable(None)
    train(model, optimizer, batches, steps=2, scheduler=scheduler)
    save_training_state(tmp_path / "c", model=model, optimizer=optimizer, scheduler=scheduler, batches=batches, step=2)
    other = make_llama(hidden=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RankwiseError, match="saved from another model"):
        load_training_state(tmp_path / "c", model=other, optimizer=torch.optim.SGD(other.parameters(), lr=1))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    fresh = make_llama()
    with pytest.raises(RankwiseError, match="optimizer state does not fit"):
        load_training_state(tmp_path / "c", model=fresh, optimizer=torch.optim.AdamW(fresh.parameters(), lr=1))
    with pytest.raises(RankwiseError, match="start_step must be an integer in"):
        train(model, optimizer, batches, steps=2, start_step=2)
    with pytest.raises(RankwiseError, match="training_state.json is missing"):
        load_training_state(tmp_path, model=model, optimizer=optimizer)
