"""Dynamic-rank adapters: DyLoRA, AdaLoRA, IncreLoRA and SoRA schedules on constructed inputs and tiny loops.

Training loops here call ``regularization_loss`` and ``after_step`` the way rankwise's training
loop does: ``zero_grad``, loss (+ regulariser), ``backward``, ``optimizer.step``, ``after_step``.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_batch, make_llama
from rankwise.adapters import (
    adapt,
    adapter_layers,
    after_step,
    effective_ranks,
    load_adapter,
    merge,
    regularization_loss,
    save_adapter,
    unload,
    unmerge,
)
from rankwise.adapters.adalora import AdaLoraLayer, budget_schedule
from rankwise.adapters.svd_triplet_family import update_smoothed_importance
from rankwise.adapters.dylora import truncate
from rankwise.adapters.increlora import RESERVE_VALUE
from rankwise.adapters.sora import soft_threshold
from rankwise.errors import RankwiseError

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj"]  # 4 layers of the tiny LLaMA: enough for a global budget, fast


def run(model: nn.Module, steps: int, lr: float = 1e-2, batch: dict | None = None) -> torch.optim.Optimizer:
    """A tiny training loop wired like rankwise.training: regulariser + after_step."""
    batch = batch or make_batch()
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        regularizer = regularization_loss(model)
        (loss if regularizer is None else loss + regularizer).backward()
        optimizer.step()
        after_step(model, step=step, total_steps=steps, optimizer=optimizer)
    model.eval()
    return optimizer


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def one_layer(method: str, rank: int = 4, n_in: int = 6, n_out: int = 5, **options) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, n_out))
    return adapt(model, method, rank=rank, targets=["0"], **options)


# ----- shared: the exported factors are exactly the update ------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [("dylora", {}), ("adalora", {"target_r": 2}), ("increlora", {}), ("sora", {"sparse_lambda": 5.0})],
)
def test_lora_factors_reproduce_the_delta_after_training(method, options):
    model = adapt(make_llama(), method, rank=4, targets=TARGETS, **options)
    run(model, steps=6)
    for layer in adapter_layers(model).values():
        up, down = layer.lora_factors()
        assert up.dtype == down.dtype == torch.float32
        assert up.shape[1] == down.shape[0] <= layer.rank
        torch.testing.assert_close(up @ down, layer.delta_weight().float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "method, options",
    [("dylora", {"eval_rank": 3}), ("adalora", {"target_r": 2}), ("increlora", {"incre_interval": 1}),
     ("sora", {"sparse_lambda": 3.0})],
)
def test_pruned_or_grown_adapters_export_exactly_to_peft(method, options, tmp_path):
    peft = pytest.importorskip("peft")
    from rankwise.adapters import export_peft

    batch = make_batch()
    model = adapt(make_llama(), method, rank=4, targets=TARGETS, **options)
    run(model, steps=6, batch=batch)
    report = export_peft(model, tmp_path, require_exact=True)
    ranks = {name: layer.lora_factors()[1].shape[0] for name, layer in adapter_layers(model).items()}
    assert {name: entry["rank"] for name, entry in report["modules"].items()} == ranks
    loaded = peft.PeftModel.from_pretrained(make_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=ATOL, rtol=0)


# ----- AdaLoRA -------------------------------------------------------------------------------


def test_adalora_budget_is_the_cubic_schedule():
    # b(0)=30, b(T)=12, t_i=10, t_f=20, T=110: b(t) = 12 + 18 (1 - (t-10)/80)^3 in between.
    expected = {0: 30, 9: 30, 10: 30, 30: 12 + int(18 * 0.75**3), 50: 12 + int(18 * 0.5**3), 89: 12, 90: 12, 110: 12}
    assert {t: budget_schedule(t, 110, 30, 12, 10, 20) for t in expected} == expected


def test_adalora_budget_matches_peft_rank_allocator():
    peft_layer = pytest.importorskip("peft.tuners.adalora.layer")
    allocator = object.__new__(peft_layer.RankAllocator)
    allocator.peft_config = SimpleNamespace(tinit=7, tfinal=13, total_step=97, deltaT=1)
    allocator.init_bgt, allocator.target_bgt = 48, 32
    for step in range(0, 98):
        assert budget_schedule(step, 97, 48, 32, 7, 13) == allocator.budget_schedule(step)[0], step


def test_adalora_pruning_matches_peft_step_by_step():
    """Same factors, same SGD steps: our lambda (masks included) equals PEFT's lora_E after every
    allocation of the cubic phase (PEFT applies its final mask one step later, so step T is left out)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    total = 12
    config = peft.AdaLoraConfig(init_r=3, target_r=1, tinit=2, tfinal=0, deltaT=1, total_step=total,
                                target_modules=["0", "2"], lora_alpha=3, orth_reg_weight=0.0)
    reference = peft.get_peft_model(copy.deepcopy(base), config)
    # PEFT scales by alpha / (r + 1e-5); the same scaling here is alpha' / r with alpha' = 3 r / (r + 1e-5).
    ours = adapt(copy.deepcopy(base), "adalora", rank=3, alpha=9 / (3 + 1e-5), targets=["0", "2"], target_r=1,
                 tinit=2, orth_reg_weight=0.0)
    for name, layer in adapter_layers(ours).items():
        theirs = reference.base_model.model.get_submodule(name)
        with torch.no_grad():
            layer.lora_P.copy_(theirs.lora_B["default"])
            layer.lora_Q.copy_(theirs.lora_A["default"])
            layer.lora_lambda.copy_(theirs.lora_E["default"].flatten())
    inputs, weights = torch.randn(8, 6), torch.randn(8, 4)
    sgd = {key: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
           for key, m in (("ours", ours), ("peft", reference))}
    for step in range(1, total):
        for key, model in (("ours", ours), ("peft", reference)):
            sgd[key].zero_grad()
            (model(inputs) * weights).sum().backward()
            sgd[key].step()
        after_step(ours, step=step, total_steps=total, optimizer=sgd["ours"])
        reference.base_model.update_and_allocate(step)
        for name, layer in adapter_layers(ours).items():
            expected = reference.base_model.model.get_submodule(name).lora_E["default"].detach().flatten()
            torch.testing.assert_close(layer.lora_lambda.detach(), expected, atol=1e-6, rtol=1e-4)
            assert torch.equal(layer.lora_lambda == 0, expected == 0), (step, name)
    assert sum(layer.effective_rank() for layer in adapter_layers(ours).values()) < 6


def test_adalora_smoothed_importance_known_values():
    average, uncertainty = torch.tensor([1.0]), torch.tensor([2.0])
    update_smoothed_importance(average, uncertainty, torch.tensor([3.0]), 0.5, 0.25)
    assert average.item() == pytest.approx(2.0)  # 0.5*1 + 0.5*3
    assert uncertainty.item() == pytest.approx(0.25 * 2.0 + 0.75 * 1.0)  # |3 - 2| = 1


def test_adalora_masks_the_lowest_importance_triplets_over_all_layers():
    model = adapt(make_llama(), "adalora", rank=3, targets=["q_proj"], target_r=1)
    layers = adapter_layers(model)
    scores = {}
    for k, layer in enumerate(layers.values()):
        with torch.no_grad():
            layer.lora_lambda.fill_(1.0)
            # s(lambda_i) = avg * unc; P and Q contribute their column / row means.
            layer.importance_avg_lambda.copy_(torch.tensor([1.0, 5.0, 3.0]) + 10 * k)
            layer.importance_unc_lambda.fill_(1.0)
            layer.importance_avg_P.fill_(0.0)
            layer.importance_avg_Q.fill_(0.0)
            layer.importance_avg_Q[0].fill_(2.0)
            layer.importance_unc_Q.fill_(1.0)
        scores[k] = layer.triplet_scores()
    torch.testing.assert_close(scores[0], torch.tensor([3.0, 5.0, 3.0]))
    torch.testing.assert_close(scores[1], torch.tensor([13.0, 15.0, 13.0]))
    AdaLoraLayer.mask_to_budget(layers, 4)
    first, second = layers.values()
    # The global top 4 are all three of layer 1 and the 5.0 of layer 0.
    assert first.rank_mask.tolist() == [False, True, False]
    assert second.rank_mask.tolist() == [True, True, True]
    assert first.lora_lambda.tolist() == [0.0, 1.0, 0.0]
    assert first.effective_rank() == 1 and second.effective_rank() == 3


def test_adalora_orthogonality_regulariser_formula():
    model = one_layer("adalora", rank=3, orth_reg_weight=0.5)
    layer = model[0]
    P, Q = layer.lora_P.detach(), layer.lora_Q.detach()
    expected = 0.5 * ((P.T @ P - torch.eye(3)).square().sum() + (Q @ Q.T - torch.eye(3)).square().sum())
    torch.testing.assert_close(layer.regularization(), expected)
    with torch.no_grad():
        layer.lora_P.copy_(torch.eye(5)[:, :3])
        layer.lora_Q.copy_(torch.eye(6)[:3])
    assert layer.regularization().item() == 0.0


def test_adalora_prunes_to_the_target_budget_and_keeps_merge_and_save_load(tmp_path):
    batch = make_batch()
    model = adapt(make_llama(), "adalora", rank=4, targets=TARGETS, target_r=2, tinit=2, tfinal=3, deltaT=2)
    layers = adapter_layers(model)
    budgets = []
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 13):
        optimizer.zero_grad()
        (model(**batch).loss + regularization_loss(model)).backward()
        optimizer.step()
        after_step(model, step=step, total_steps=12, optimizer=optimizer)
        budgets.append(sum(int(layer.rank_mask.sum()) for layer in layers.values()))
    # Masks follow b(t) at t = 2, 4, 6, 8 (deltaT=2 from tinit=2), then b(T) fixed from t = 9.
    expected = [16]
    for step in range(2, 13):
        expected.append(budget_schedule(step, 12, 16, 8, 2, 3) if step % 2 == 0 or step >= 9 else expected[-1])
    assert budgets == expected and budgets[-1] == 8
    final_masks = [layer.rank_mask.clone() for layer in layers.values()]
    for layer, mask in zip(layers.values(), final_masks):
        assert torch.all(layer.lora_lambda[~mask] == 0)
    assert sum(layer.effective_rank() for layer in layers.values()) <= 8
    model.eval()
    expected_logits = logits(model, batch)
    merge(model)
    torch.testing.assert_close(logits(model, batch), expected_logits, atol=ATOL, rtol=0)
    unmerge(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected_logits, atol=ATOL, rtol=0)
    for layer, mask in zip(adapter_layers(loaded).values(), final_masks):
        assert torch.equal(layer.rank_mask, mask)


def test_adalora_after_step_errors_leave_the_state():
    model = adapt(make_llama(), "adalora", rank=2, targets=["q_proj"], target_r=1, tinit=3, tfinal=3)
    with pytest.raises(RankwiseError, match=r"total_steps must be an integer >= 7, got 5; it must exceed tinit \+ tfinal"):
        after_step(model, step=1, total_steps=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match="no adapter has one"):
        after_step(model, step=4, total_steps=20)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    merge(model)
    with pytest.raises(RankwiseError, match="unmerge"):
        after_step(model, step=4, total_steps=20)


@pytest.mark.parametrize(
    "options, message",
    [({"target_r": 5}, "target_r 5 is above the rank 4"), ({"beta1": 1.0}, r"option beta1 must be a number in \(0, 1\)"),
     ({"deltaT": 0}, "option deltaT must be an integer >= 1"), ({"orth_reg_weight": -1}, "option orth_reg_weight must be")],
)
def test_adalora_bad_options(llama, options, message):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        adapt(llama, "adalora", rank=4, **options)
    assert not adapter_layers(llama)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


# ----- IncreLoRA -----------------------------------------------------------------------------


def test_increlora_importance_is_the_update_sensitivity():
    model = one_layer("increlora", rank=4, init_r=2, target_r=3)
    layer = model[0]
    with torch.no_grad():
        layer.lora_lambda.copy_(torch.tensor([0.5, -1.0, 0.0, 0.0]))
    model.train()
    x = torch.randn(3, 6)
    weights = torch.randn(3, 5)
    (model(x) * weights).sum().backward()
    update = layer.delta_weight().detach()
    gradient = weights.T @ x  # dL/d(delta) for L = sum(w * (x delta^T))
    expected = (update * gradient).abs().sum() / math.sqrt(update.numel())
    torch.testing.assert_close(layer.current_importance, expected)


def test_increlora_grows_the_top_h_layers_by_score():
    model = adapt(make_llama(), "increlora", rank=4, targets=["q_proj", "k_proj"], init_r=1, target_r=2,
                  incre_rank=1, top_h=2, incre_interval=1)
    layers = list(adapter_layers(model).values())
    scores = [0.1, 0.9, 0.5, 0.2]
    for layer, score in zip(layers, scores):
        layer.current_importance.fill_(score)
        layer.importance_seen = True
    after_step(model, step=1, total_steps=10)
    # Ibar = 0.15 * I and Ubar = 0.15 * 0.85 * I: S is monotone in I, so layers 1 and 2 grow.
    assert [layer.allocated_rank() for layer in layers] == [1, 2, 2, 1]
    grown = layers[1]
    assert grown.lora_lambda[1].item() == pytest.approx(RESERVE_VALUE)
    assert grown.active.tolist() == [True, True, False, False] and grown.reserve.tolist() == [False, False, True, False]


def test_increlora_adds_rank_while_adalora_prunes(tmp_path):
    """The papers' contrast: IncreLoRA's total rank rises from init_r * n to target_r * n,
    AdaLoRA's falls from r * n to target_r * n, both under the same loop."""
    batch = make_batch()
    increlora = adapt(make_llama(), "increlora", rank=4, targets=TARGETS, init_r=1, target_r=3, incre_rank=1, top_h=2,
                      incre_interval=2)
    adalora = adapt(make_llama(), "adalora", rank=4, targets=TARGETS, target_r=3, tfinal=2, deltaT=1)
    totals = {"increlora": [], "adalora": []}
    optimizers = {}
    for name, model in (("increlora", increlora), ("adalora", adalora)):
        optimizers[name] = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
    for step in range(1, 11):
        for name, model in (("increlora", increlora), ("adalora", adalora)):
            optimizers[name].zero_grad()
            (model(**batch).loss + regularization_loss(model)).backward()
            optimizers[name].step()
            after_step(model, step=step, total_steps=10, optimizer=optimizers[name])
        totals["increlora"].append(sum(l.allocated_rank() for l in adapter_layers(increlora).values()))
        totals["adalora"].append(sum(l.allocated_rank() for l in adapter_layers(adalora).values()))
    assert totals["increlora"] == sorted(totals["increlora"]) and totals["increlora"][0] == 4
    assert totals["increlora"][-1] == 12
    assert totals["adalora"] == sorted(totals["adalora"], reverse=True) and totals["adalora"][-1] == 12
    # Budget reached: reserves dropped, importance tracking off, only active components left.
    for layer in adapter_layers(increlora).values():
        assert not layer.reserve.any() and not layer.tracking_importance
    increlora.eval()
    expected = logits(increlora, batch)
    merge(increlora)
    torch.testing.assert_close(logits(increlora, batch), expected, atol=ATOL, rtol=0)
    unmerge(increlora)
    save_adapter(increlora, tmp_path)
    loaded = load_adapter(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)
    assert [l.allocated_rank() for l in adapter_layers(loaded).values()] == \
        [l.allocated_rank() for l in adapter_layers(increlora).values()]
    torch.testing.assert_close(logits(unload(loaded), batch), expected, atol=ATOL, rtol=0)


def test_increlora_advance_learning_trains_the_reserve_ahead():
    model = one_layer("increlora", rank=4, init_r=1, target_r=2, incre_rank=1)
    layer = model[0]
    assert layer.active.tolist() == [True, False, False, False]
    assert layer.reserve.tolist() == [False, True, False, False]
    model.train()
    model(torch.randn(4, 6)).sum().backward()
    assert layer.lora_P.grad[:, 1].abs().sum() > 0  # the reserve's P_i learns in advance
    assert layer.lora_P.grad[:, 2:].abs().sum() == 0  # unused capacity gets nothing
    assert layer.lora_lambda.grad[1] == 0  # the reserve's lambda is held


def test_increlora_after_step_needs_a_backward_pass():
    model = one_layer("increlora", rank=4, init_r=1, target_r=2)
    with pytest.raises(RankwiseError, match="needs a backward pass"):
        after_step(model, step=1, total_steps=4)


def test_increlora_capacity_must_leave_room_to_grow(llama):
    with pytest.raises(RankwiseError, match="leaves no room to grow"):
        adapt(llama, "increlora", rank=3, init_r=2, target_r=3, incre_rank=2)
    with pytest.raises(RankwiseError, match=r"target_r must be in \[1, rank=2\], got 3"):
        adapt(llama, "increlora", rank=2, init_r=1, target_r=3)
    assert not adapter_layers(llama)


# ----- SoRA ----------------------------------------------------------------------------------


def test_sora_soft_threshold_on_a_constructed_gate():
    gate = torch.tensor([0.3, -0.05, 0.1, -0.4, 0.0])
    torch.testing.assert_close(soft_threshold(gate, 0.1), torch.tensor([0.2, 0.0, 0.0, -0.3, 0.0]))


def test_sora_after_step_thresholds_with_lr_times_lambda():
    model = one_layer("sora", rank=4, sparse_lambda=2.0)
    layer = model[0]
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([1.0, -0.5, 0.15, -0.1]))
    optimizer = torch.optim.SGD([{"params": [layer.gate], "lr": 0.05}, {"params": [layer.lora_A, layer.lora_B]}], lr=1)
    after_step(model, step=1, total_steps=2, optimizer=optimizer)  # threshold 0.05 * 2 = 0.1
    torch.testing.assert_close(layer.gate.detach(), torch.tensor([0.9, -0.4, 0.05, 0.0]))
    assert layer.effective_rank() == 3
    assert effective_ranks(model) == {"0": 3}
    with pytest.raises(RankwiseError, match="needs the optimizer"):
        after_step(model, step=2, total_steps=2)


def test_sora_training_prunes_gates_and_pruned_ranks_drop_out(tmp_path):
    batch = make_batch()
    model = adapt(make_llama(), "sora", rank=4, targets=TARGETS, sparse_lambda=20.0)
    run(model, steps=8, lr=1e-2, batch=batch)
    ranks = effective_ranks(model)
    assert sum(ranks.values()) < 4 * len(ranks)  # |g| ~ N(0,1) and the threshold is 0.2 per step
    for layer in adapter_layers(model).values():
        up, down = layer.lora_factors()
        assert up.shape[1] == layer.effective_rank()
    expected = logits(model, batch)
    merge(model)
    torch.testing.assert_close(logits(model, batch), expected, atol=ATOL, rtol=0)
    unmerge(model)
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_llama(), tmp_path)
    assert effective_ranks(loaded) == ranks
    torch.testing.assert_close(logits(loaded, batch), expected, atol=ATOL, rtol=0)


def test_sora_without_sparsity_is_gated_lora():
    model = one_layer("sora", rank=3, sparse_lambda=0.0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 6)
    expected = x @ (layer.lora_B @ torch.diag(layer.gate) @ layer.lora_A).T * (layer.alpha / 3)
    torch.testing.assert_close(layer.adapter_forward(x), expected, atol=1e-6, rtol=1e-5)


# ----- DyLoRA --------------------------------------------------------------------------------


def test_dylora_truncation_keeps_the_leading_rows_and_columns(tmp_path):
    batch = make_batch()
    model = adapt(make_llama(), "dylora", rank=4, targets=TARGETS, frozen=False)
    run(model, steps=6, batch=batch)
    before = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
              for name, layer in adapter_layers(model).items()}
    # eval_rank=2 on the untruncated model is what truncation to 2 must reproduce.
    for layer in adapter_layers(model).values():
        layer.options["eval_rank"] = 2
    at_rank_two = logits(model, batch)
    truncate(model, 2)
    for name, layer in adapter_layers(model).items():
        A, B = before[name]
        assert layer.rank == 2
        assert torch.equal(layer.lora_A, A[:2]) and torch.equal(layer.lora_B, B[:, :2])
        torch.testing.assert_close(layer.delta_weight(), (layer.alpha / 2) * B[:, :2] @ A[:2])
        up, down = layer.lora_factors()
        torch.testing.assert_close(up @ down, layer.delta_weight())
    torch.testing.assert_close(logits(model, batch), at_rank_two, atol=ATOL, rtol=0)
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_llama(), tmp_path)
    assert all(layer.rank == 2 for layer in adapter_layers(loaded).values())
    torch.testing.assert_close(logits(loaded, batch), at_rank_two, atol=ATOL, rtol=0)


def test_dylora_sampled_rank_is_shared_and_uniform():
    model = adapt(make_llama(), "dylora", rank=4, targets=TARGETS, min_rank=2)
    layers = list(adapter_layers(model).values())
    seen = []
    for step in range(1, 301):
        after_step(model, step=step, total_steps=300)
        assert len({layer.sampled_rank for layer in layers}) == 1
        seen.append(layers[0].sampled_rank)
    counts = {b: seen.count(b) for b in (2, 3, 4)}
    assert set(seen) == {2, 3, 4} and min(counts.values()) > 60  # ~100 each


def test_dylora_frozen_updates_only_the_sampled_row_and_column():
    model = one_layer("dylora", rank=4)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    model.train()
    layer.sampled_rank = 3
    model(torch.randn(5, 6)).sum().backward()
    assert layer.lora_A.grad[[0, 1, 3]].abs().sum() == 0 and layer.lora_A.grad[2].abs().sum() > 0
    assert layer.lora_B.grad[:, [0, 1, 3]].abs().sum() == 0 and layer.lora_B.grad[:, 2].abs().sum() > 0
    # Forward in training uses the truncated block with scaling alpha / b.
    x = torch.randn(2, 6)
    expected = x @ ((layer.alpha / 3) * layer.lora_B[:, :3] @ layer.lora_A[:3]).T
    torch.testing.assert_close(layer.adapter_forward(x), expected)
    model.eval()
    torch.testing.assert_close(layer.delta_weight(), (layer.alpha / 4) * layer.lora_B @ layer.lora_A)


def test_dylora_merge_in_training_mode_unmerges_the_same_rank(batch):
    model = adapt(make_llama(), "dylora", rank=4, targets=TARGETS)
    run(model, steps=3, batch=batch)
    weights = {n: l.base.weight.clone() for n, l in adapter_layers(model).items()}
    model.train()
    merge(model)
    after_step(model, step=4, total_steps=10)  # a new sample must not change what unmerge removes
    model.eval()
    unmerge(model)
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.base.weight, weights[name], atol=1e-6, rtol=0)


def test_dylora_bad_input(llama):
    with pytest.raises(RankwiseError, match="eval_rank 5 is above the rank 4"):
        adapt(llama, "dylora", rank=4, eval_rank=5)
    with pytest.raises(RankwiseError, match="min_rank 5 is above the rank 4"):
        adapt(llama, "dylora", rank=4, min_rank=5)
    with pytest.raises(RankwiseError, match="needs a model adapted with 'dylora'"):
        truncate(llama, 2)
    adapt(llama, "dylora", rank=4, targets=TARGETS)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(RankwiseError, match=r"option rank must be an integer in \[1, 4\], got 5"):
        truncate(llama, 5)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
