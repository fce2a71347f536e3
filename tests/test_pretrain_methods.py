"""What each parametrisation's paper says, checked by known answers: ReLoRA's restarts and schedule,
SLTrain's memory and gradients, LOST's SVD split, structured_ffn's self-guided training, the Monarch
projection, SST's spectral gradients and resampling, the refactorisation options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_batch, make_gpt2, make_llama
from rankwise.errors import RankwiseError
from rankwise.pretrain import jagged_cosine_schedule, monarch_dense, parametrisation, parametrize, project_monarch
from rankwise.pretrain.blocks import block_rank_counts, monarch_multiply, monarch_shapes
from rankwise.pretrain.refactor import rebalance_factors
from rankwise.pretrain.relora import ReLoRALinear, magnitude_prune
from rankwise.pretrain.sltrain import SLTrainLinear, random_support
from rankwise.pretrain.sst import SSTLinear, sampling_probabilities


def single(out_features: int, in_features: int, *, bias: bool = True, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_features, out_features, bias=bias, dtype=dtype))


def adam_step(model: nn.Module, optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()


# ----- ReLoRA ------------------------------------------------------------------------------------


def test_jagged_cosine_schedule_known_values():
    """Warm-up 2, 12 steps, restarts every 4 with a 2-step re-warm-up, floor 0.1."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = jagged_cosine_schedule(optimizer, total_steps=12, warmup_steps=2, restart_every=4,
                                      restart_warmup_steps=2, min_ratio=0.1)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()

    def envelope(s):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 2) / 10)))

    # seen[j] is the lr of training step j + 1; restarts after steps 4 and 8
    expected = [0.5, 1.0, envelope(2), envelope(3), envelope(6) * 0.5, envelope(6) * 1.0, envelope(6), envelope(7),
                envelope(10) * 0.5, envelope(10), envelope(10), envelope(11)]
    assert seen == pytest.approx(expected, rel=1e-12)
    with pytest.raises(RankwiseError, match="restart_every must be a positive integer or None"):
        jagged_cosine_schedule(optimizer, total_steps=4, warmup_steps=0, restart_every=0, restart_warmup_steps=0)


def test_magnitude_prune_keeps_exactly_the_largest_entries():
    tensor = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 1.0, -4.0, 0.05, 0.3, -0.7])
    assert torch.equal(magnitude_prune(tensor, 0.8), torch.tensor([0, -3.0, 0, 0, 0, 0, -4.0, 0, 0, 0]))
    assert torch.equal(magnitude_prune(tensor, 0.0), tensor) and not magnitude_prune(tensor, 1.0).any()


def test_relora_restart_keeps_the_output_restarts_the_factors_and_prunes_the_moments():
    model = single(24, 16)
    method = parametrisation("relora", rank=4, alpha=2.0, dropout=0.0, restart_every=3, seed=0)
    method.apply(model)
    layer = model[0]
    assert isinstance(layer, ReLoRALinear) and not layer.lora_B.weight.any() and layer.scaling == 0.5
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(5, 16, dtype=torch.float64)
    for step in (1, 2):
        adam_step(model, optimizer, x)
        method.after_step(model, step=step, total_steps=10, optimizer=optimizer)
    adam_step(model, optimizer, x)
    before_out, weight_before = model(x).detach(), layer.weight.detach().clone()
    update = layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight).detach()
    old_a = layer.lora_A.weight.detach().clone()
    method.after_step(model, step=3, total_steps=10, optimizer=optimizer)
    torch.testing.assert_close(model(x).detach(), before_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.detach(), weight_before + update, rtol=0, atol=1e-15)
    assert not layer.lora_B.weight.any()
    new_a = layer.lora_A.weight.detach()
    assert not torch.equal(new_a, old_a) and new_a.abs().max() <= 1 / math.sqrt(16)
    assert float(new_a.std()) == pytest.approx(1 / math.sqrt(3 * 16), rel=0.25)  # uniform in +-1/sqrt(in)
    for parameter in (layer.lora_A.weight, layer.lora_B.weight):
        for key in ("exp_avg", "exp_avg_sq"):
            pruned = optimizer.state[parameter][key]
            assert (pruned != 0).sum() == parameter.numel() - int(0.99 * parameter.numel())


def test_relora_restarts_at_multiples_of_k_but_not_at_the_last_step_and_without_restarts_is_lora():
    model = single(8, 8)
    method = parametrisation("relora", rank=2, restart_every=2, dropout=0.0, seed=0)
    method.apply(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 8, dtype=torch.float64)
    changed = []
    for step in range(1, 7):
        adam_step(model, optimizer, x)
        weight = model[0].weight.detach().clone()
        method.after_step(model, step=step, total_steps=6, optimizer=optimizer)
        changed.append(not torch.equal(weight, model[0].weight))
    assert changed == [False, True, False, True, False, False]  # no merge after the final step

    lora = single(8, 8)
    frozen = lora[0].weight.detach().clone()
    plain = parametrisation("relora", rank=2, restart_every=None, seed=0)
    plain.apply(lora)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 5):
        adam_step(lora, optimizer, x)
        plain.after_step(lora, step=step, total_steps=4, optimizer=optimizer)
    assert torch.equal(lora[0].weight, frozen) and lora[0].lora_B.weight.any()


def test_relora_warm_start_trains_w_alone_then_freezes_it_and_switches_to_lora():
    model = single(8, 8)
    method = parametrisation("relora", rank=2, warm_start_steps=2, restart_every=2, dropout=0.0, seed=0)
    method.apply(model)
    layer = model[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 8, dtype=torch.float64)
    start = layer.weight.detach().clone()
    adam_step(model, optimizer, x)
    assert layer.lora_A.weight.grad is None and layer.weight.grad is not None
    method.after_step(model, step=1, total_steps=8, optimizer=optimizer)
    adam_step(model, optimizer, x)
    trained = layer.weight.detach().clone()
    out = model(x).detach()
    method.after_step(model, step=2, total_steps=8, optimizer=optimizer)  # the switch
    assert not torch.equal(trained, start) and not layer.weight.requires_grad
    assert layer.weight not in optimizer.state and layer.lora_active
    torch.testing.assert_close(model(x).detach(), out, rtol=0, atol=0)  # B = 0: the switch changes nothing
    adam_step(model, optimizer, x)
    assert torch.equal(layer.weight, trained) and layer.lora_B.weight.any()
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = method.schedule(sgd, warmup_steps=1, total_steps=8)
    lrs = []
    for _ in range(5):
        lrs.append(schedule.get_last_lr()[0])
        sgd.step()
        schedule.step()
    assert lrs[2] < lrs[1] and lrs[4] < lrs[3]  # re-warm-ups after the switch (step 2) and the restart (step 4)


def test_relora_pruning_keeps_the_top_moments_known_answer():
    model = single(6, 10)
    method = parametrisation("relora", rank=3, restart_every=1, dropout=0.0, optimizer_pruning=0.9, seed=0)
    method.apply(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    adam_step(model, optimizer, torch.randn(4, 10, dtype=torch.float64))
    a = model[0].lora_A.weight
    moment = optimizer.state[a]["exp_avg_sq"].clone()
    method.after_step(model, step=1, total_steps=5, optimizer=optimizer)
    keep = moment.numel() - int(0.9 * moment.numel())
    top = moment.flatten().abs().topk(keep).indices
    expected = torch.zeros_like(moment).flatten()
    expected[top] = moment.flatten()[top]
    assert torch.equal(optimizer.state[a]["exp_avg_sq"], expected.view_as(moment))


# ----- SLTrain -----------------------------------------------------------------------------------


def saved_for_backward(module: nn.Module, x: torch.Tensor) -> list[torch.Size]:
    shapes = []

    def pack(tensor):
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return shapes


def test_sltrain_keeps_no_dense_matrix_for_backward_and_counts_like_the_paper():
    m, n, r, density = 40, 24, 3, 0.1
    model = single(m, n, bias=False, dtype=torch.float32)
    parametrize(model, "sltrain", rank=r, density=density, seed=0)
    layer = model[0]
    nnz = int(density * m * n)
    assert sum(p.numel() for p in layer.parameters()) == r * (m + n) + nnz
    assert layer.support.numel() == nnz and "support" not in layer.state_dict()
    shapes = saved_for_backward(layer, torch.randn(7, n, requires_grad=True))
    assert all(math.prod(s) < m * n for s in shapes), shapes  # x (7 x 24), B, A, values, support


def test_sltrain_gradients_equal_autograd_through_the_dense_weight():
    model = single(12, 9, dtype=torch.float64)
    parametrize(model, "sltrain", rank=2, density=0.3, seed=3)
    layer = model[0]
    with torch.no_grad():
        layer.up.weight.normal_()  # B = 0 at init would hide dA
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    weight_grad = torch.randn(2, 5, 12, dtype=torch.float64)
    (layer(x) * weight_grad).sum().backward()
    got = [t.grad.clone() for t in (x, layer.up.weight, layer.down.weight, layer.values)]
    for t in (x, layer.up.weight, layer.down.weight, layer.values):
        t.grad = None
    dense = torch.zeros(12 * 9, dtype=torch.float64).index_put((layer.support,), layer.values)
    reference = layer.scaling * layer.up.weight @ layer.down.weight + dense.view(12, 9)
    ((x @ reference.T + layer.bias) * weight_grad).sum().backward()
    for mine, theirs in zip(got, (x.grad, layer.up.weight.grad, layer.down.weight.grad, layer.values.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_sltrain_support_is_uniform_distinct_seeded_and_follows_a_loaded_seed():
    support = random_support(50, 40, 200, seed=5, device=torch.device("cpu"))
    assert support.unique().numel() == 200 and torch.equal(support, random_support(50, 40, 200, 5, torch.device("cpu")))
    assert 0 <= support.min() and support.max() < 2000
    counts = torch.bincount(torch.cat([random_support(10, 10, 30, s, torch.device("cpu")) for s in range(400)]),
                            minlength=100).float()
    assert counts.mean() == pytest.approx(120) and counts.std() / counts.mean() < 0.15  # uniform: 120 each
    a, b = single(10, 10), single(10, 10)
    parametrize(a, "sltrain", rank=2, seed=1, density=0.2)
    parametrize(b, "sltrain", rank=2, seed=2, density=0.2)
    assert not torch.equal(a[0].support, b[0].support)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a[0].support, b[0].support)


def test_sltrain_init_follows_the_release():
    model = single(64, 100, dtype=torch.float32)
    parametrize(model, "sltrain", rank=8, seed=0)
    layer = model[0]
    assert isinstance(layer, SLTrainLinear) and not layer.up.weight.any() and layer.scaling == 32 / 8
    for tensor in (layer.down.weight.detach(), layer.values.detach()):
        assert tensor.abs().max() <= 0.1 and float(tensor.std()) == pytest.approx(0.1 / math.sqrt(3), rel=0.1)


# ----- LOST --------------------------------------------------------------------------------------


def test_lost_splits_the_dense_init_into_its_top_rank_part_and_the_residual_strongest_channels():
    model = single(20, 30)
    weight = model[0].weight.detach().clone()
    parametrize(model, "lost", rank=5, channel_density=0.2)
    layer = model[0]
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    top = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close((layer.up.weight @ layer.down.weight).detach(), top, rtol=0, atol=1e-12)
    assert float(layer.up.weight.detach().norm()) == pytest.approx(float(layer.down.weight.detach().norm()), rel=1e-12)  # balanced
    residual = weight - top
    expected = residual.norm(dim=0).topk(6).indices.sort().values
    assert torch.equal(layer.channels, expected)
    dense = layer.dense_weight().detach()
    torch.testing.assert_close(dense[:, expected], weight[:, expected], rtol=0, atol=1e-12)  # B A + R = W0 there
    others = torch.ones(30, dtype=torch.bool)
    others[expected] = False
    torch.testing.assert_close(dense[:, others], top[:, others], rtol=0, atol=1e-12)


# ----- structured FFN ----------------------------------------------------------------------------


def test_structured_ffn_replaces_only_the_ffn_layers_of_llama_and_gpt2():
    for make, ffn in ((make_llama, ("gate_proj", "up_proj", "down_proj")), (make_gpt2, ("c_fc", "c_proj"))):
        model = make()
        originals = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
        parametrize(model, "structured_ffn", rank=4, guided_fraction=0.0)
        for name, kind in originals.items():
            now = type(model.get_submodule(name)).__name__
            is_ffn = ".mlp." in name and name.endswith(ffn)
            assert now == ("StructuredLinear" if is_ffn else kind), (name, now)


def test_self_guided_training_decays_the_guide_then_removes_it_from_layer_and_optimizer():
    model = make_llama()
    method = parametrisation("structured_ffn", rank=4, guided_fraction=0.5, seed=0)
    method.apply(model)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.structured(x))  # the guide starts as the structured product
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    guide = layer.guide.weight
    ratios = []
    for step in range(1, 6):
        optimizer.zero_grad()
        model(**make_batch()).loss.backward()
        optimizer.step()
        method.after_step(model, step=step, total_steps=10, optimizer=optimizer)
        ratios.append(float(layer.guide_ratio))
    assert ratios[:4] == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 5)) for t in range(1, 5)])
    assert ratios[4] == 0.0 and layer.guide is None and guide not in optimizer.state
    assert all(guide is not p for group in optimizer.param_groups for p in group["params"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.structured(x), rtol=0, atol=0)
    linear = parametrisation("structured_ffn", rank=4, guide_schedule="linear")
    assert [linear.guide_ratio(t, 8) for t in (0, 2, 4, 6)] == [1.0, 0.5, 0.0, 0.0]


def test_structured_ffn_block_structures_and_their_orthogonal_init():
    model = parametrize(make_llama(), "structured_ffn", rank=8, structure="block_dense", guided_fraction=0.0, seed=0)
    layer = model.model.layers[0].mlp.up_proj  # 64 x 32: 4 blocks of (8/4) x (32/4), then 64 x 8
    assert layer.blkdiag1.shape == (4, 2, 8) and layer.blkdiag2.shape == (64, 8)
    eye = torch.eye(2)
    for block in layer.blkdiag1.detach():
        torch.testing.assert_close(block @ block.T, eye, rtol=0, atol=1e-5)  # orthonormal rows (release: ortho)
    torch.testing.assert_close(layer.blkdiag2.T @ layer.blkdiag2, torch.eye(8), rtol=0, atol=1e-5)
    dense = layer.dense_weight().detach()
    # W = B blockdiag(D): each column block only sees its own 2 rows of D
    torch.testing.assert_close(dense[:, :8], layer.blkdiag2[:, :2].detach() @ layer.blkdiag1[0].detach())
    shuffle = parametrize(make_llama(), "structured_ffn", structure="block_shuffle", guided_fraction=0.0, seed=0)
    layer = shuffle.model.layers[0].mlp.up_proj
    assert (layer.blkdiag1.shape, layer.blkdiag2.shape) == monarch_shapes(64, 32, 2)
    with pytest.raises(RankwiseError, match="structure 'lowrank' has no blocks"):
        parametrisation("structured_ffn", rank=4, nblocks=2)
    with pytest.raises(RankwiseError, match="block_dense splits .* into 3 blocks"):
        parametrize(make_llama(), "structured_ffn", rank=4, structure="block_dense", nblocks=3)


# ----- Monarch -----------------------------------------------------------------------------------

SHAPES = [(16, 16, 4), (16, 16, 2), (24, 8, 2), (8, 24, 4), (12, 12, 3)]


@pytest.mark.parametrize("m, n, b", SHAPES)
def test_monarch_product_matches_its_index_formula(m, n, b):
    gen = torch.Generator().manual_seed(0)
    w1_shape, w2_shape = monarch_shapes(m, n, b)
    w1 = torch.randn(w1_shape, generator=gen, dtype=torch.float64)
    w2 = torch.randn(w2_shape, generator=gen, dtype=torch.float64)
    k, q, p = w1_shape
    l, s, r = w2_shape
    expected = torch.zeros(m, n, dtype=torch.float64)
    for f in range(k * q):  # M[s L + l, k P + p] += w2[l, s, f div L] w1[k, f mod Q, p], f = k Q + q = r L + l
        kk, qq, rr, ll = f // q, f % q, f // l, f % l
        for ss in range(s):
            expected[ss * l + ll, kk * p:(kk + 1) * p] += w2[ll, ss, rr] * w1[kk, qq]
    torch.testing.assert_close(monarch_dense(w1, w2), expected, rtol=0, atol=1e-12)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(monarch_multiply(x, w1, w2), x @ expected.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m, n, b", SHAPES)
def test_project_monarch_recovers_a_monarch_matrix_exactly(m, n, b):
    gen = torch.Generator().manual_seed(1)
    w1_shape, w2_shape = monarch_shapes(m, n, b)
    matrix = monarch_dense(torch.randn(w1_shape, generator=gen, dtype=torch.float64),
                           torch.randn(w2_shape, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(monarch_dense(*project_monarch(matrix, b)), matrix, rtol=0, atol=1e-11)


@pytest.mark.parametrize("m, n, b", SHAPES)
def test_project_monarch_is_the_best_approximation(m, n, b):
    """Lower bound: every Monarch matrix has rank <= T(l, k) on block (l, k), so by Eckart-Young its error is
    at least the root sum of the blocks' discarded squared singular values; the projection attains it, and no
    random Monarch matrix nor a gradient-descent fit from 5 random starts does better."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(m, n, generator=gen, dtype=torch.float64)
    error = float((weight - monarch_dense(*project_monarch(weight, b))).norm())
    w1_shape, w2_shape = monarch_shapes(m, n, b)
    counts = block_rank_counts(w1_shape, w2_shape)
    l_count, s_count, p_count = w2_shape[0], w2_shape[1], w1_shape[2]
    bound = 0.0
    for l in range(l_count):
        for k in range(w1_shape[0]):
            block = weight[torch.arange(s_count) * l_count + l][:, k * p_count:(k + 1) * p_count]
            bound += float(torch.linalg.svdvals(block)[int(counts[l, k]):].pow(2).sum())
    assert error == pytest.approx(math.sqrt(bound), rel=1e-10)
    for start in range(5):
        torch.manual_seed(start)
        w1 = torch.randn(w1_shape, dtype=torch.float64, requires_grad=True)
        w2 = torch.randn(w2_shape, dtype=torch.float64, requires_grad=True)
        assert float((weight - monarch_dense(w1, w2)).norm()) >= error
        fit = torch.optim.Adam([w1, w2], lr=0.05)
        for _ in range(300):
            fit.zero_grad()
            loss = (weight - monarch_dense(w1, w2)).pow(2).sum()
            loss.backward()
            fit.step()
        assert float(loss.sqrt()) >= error * (1 - 1e-6)


def test_monarch_init_matches_the_dense_scale_or_projects_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128))
    nn.init.normal_(model[0].weight, std=0.02)
    weight = model[0].weight.detach().clone()
    projected = parametrize(nn.Sequential(nn.Linear(256, 128)), "monarch", init="project")
    random = parametrize(model, "monarch", seed=0)
    assert float(random[0].dense_weight().detach().pow(2).mean().sqrt()) == pytest.approx(0.02, rel=0.05)
    model2 = nn.Sequential(nn.Linear(256, 128))
    with torch.no_grad():
        model2[0].weight.copy_(weight)
    parametrize(model2, "monarch", init="project")
    torch.testing.assert_close(model2[0].dense_weight().detach(), monarch_dense(*project_monarch(weight, 4)))
    assert projected[0].blkdiag1.shape == (4, 32, 64) and projected[0].blkdiag2.shape == (4, 32, 32)


# ----- SST ---------------------------------------------------------------------------------------


def test_sst_starts_as_the_dense_init_and_gives_the_enhanced_gradients():
    model = single(10, 7)
    weight = model[0].weight.detach().clone()
    parametrize(model, "sst", rank=3, seed=0)
    layer = model[0]
    assert isinstance(layer, SSTLinear)
    torch.testing.assert_close(layer.dense_weight().detach(), weight, rtol=0, atol=1e-12)  # zero distortion
    x = torch.randn(4, 7, dtype=torch.float64)
    g = torch.randn(4, 10, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    dense_grad = g.T @ x  # dL/dW
    u = torch.cat([layer.u_active, layer.u_frozen], 1).detach()
    v = torch.cat([layer.v_active, layer.v_frozen], 1).detach()
    torch.testing.assert_close(layer.u_active.grad, dense_grad @ layer.v_active.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.v_active.grad, dense_grad.T @ layer.u_active.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.sigma.grad, torch.diagonal(u.T @ dense_grad @ v), rtol=1e-12, atol=1e-12)


def test_sst_sampling_law():
    sigma = torch.tensor([3.0, 1.0, 0.0, 0.0])
    assert sampling_probabilities(sigma).tolist() == pytest.approx([0.5 * (0.25 + 0.75), 0.5 * (0.25 + 0.25),
                                                                    0.125, 0.125])
    draws = torch.zeros(4)
    for seed in range(2000):
        draws[torch.multinomial(sampling_probabilities(sigma), 1, generator=torch.Generator().manual_seed(seed))] += 1
    assert (draws / 2000).tolist() == pytest.approx([0.5, 0.25, 0.125, 0.125], abs=0.03)


def test_sst_after_step_projects_resamples_and_re_decomposes_each_round():
    model = single(12, 8)
    method = parametrisation("sst", rank=2, resample_every=2, iterations_per_round=2, seed=0)
    method.apply(model)
    layer = model[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(6, 8, dtype=torch.float64)
    seen_active = []
    for step in range(1, 7):
        adam_step(model, optimizer, x)
        sigma_moment = optimizer.state[layer.sigma]["exp_avg"].clone()
        iteration = int(layer.iteration)
        method.after_step(model, step=step, total_steps=10, optimizer=optimizer)
        assert (layer.sigma >= 0).all()
        torch.testing.assert_close(layer.u_active.norm(dim=0), torch.ones(2, dtype=torch.float64))
        torch.testing.assert_close(layer.v_active.norm(dim=0), torch.ones(2, dtype=torch.float64))
        if step % 2:
            assert layer.u_active in optimizer.state
            continue
        seen_active.append(layer.u_active.detach().clone())
        assert layer.u_active not in optimizer.state and layer.v_active not in optimizer.state
        if iteration % 2 == 0:  # a round ended: re-SVD, orthonormal again, all state reset
            u = torch.cat([layer.u_active, layer.u_frozen], 1).detach()
            torch.testing.assert_close(u.T @ u, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-10)
            assert layer.sigma not in optimizer.state
        else:  # sigma's moments follow the permutation that put the new active pairs first
            moved = optimizer.state[layer.sigma]["exp_avg"]
            assert sorted(moved.tolist()) == pytest.approx(sorted(sigma_moment.tolist()))
    assert len({tuple(a.flatten().tolist()) for a in seen_active}) == len(seen_active)


def test_sst_re_decomposition_does_not_change_the_layer():
    model = single(9, 6)
    method = parametrisation("sst", rank=2, resample_every=1, iterations_per_round=1, seed=0)
    method.apply(model)
    layer = model[0]
    with torch.no_grad():
        layer.u_active.add_(0.3)  # no longer orthogonal to the frozen vectors
    before = layer.dense_weight().detach().clone()
    layer.decompose(layer.dense_weight().detach())
    torch.testing.assert_close(layer.dense_weight().detach(), before, rtol=0, atol=1e-12)


# ----- refactorisation and momentum reset (arXiv 2505.22922) ---------------------------------------


def test_rebalance_keeps_the_product_and_equalises_the_factors():
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(20, 4, generator=gen, dtype=torch.float64) * 5
    down = torch.randn(4, 12, generator=gen, dtype=torch.float64) * 0.1
    product = up @ down
    rebalance_factors(up, down)
    torch.testing.assert_close(up @ down, product, rtol=0, atol=1e-12)
    torch.testing.assert_close(up.T @ up, down @ down.T, rtol=0, atol=1e-12)  # both diag(S)
    singular = torch.linalg.svdvals(product)[:4]
    torch.testing.assert_close(torch.diagonal(up.T @ up), singular, rtol=1e-10, atol=0)


@pytest.mark.parametrize("method, options", [("lowrank", {"seed": 0}), ("sltrain", {"seed": 0, "density": 0.2}),
                                             ("lost", {})])
def test_refactor_and_momentum_reset_act_every_t_steps(method, options):
    model = single(10, 8)
    hook = parametrisation(method, rank=3, refactor_every=2, momentum_reset_every=3, **options)
    hook.apply(model)
    layer = model[0]
    with torch.no_grad():
        layer.up.weight.normal_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 8, dtype=torch.float64)
    for step in range(1, 7):
        adam_step(model, optimizer, x)
        out = model(x).detach()
        method_state = layer.up.weight in optimizer.state
        hook.after_step(model, step=step, total_steps=7, optimizer=optimizer)
        torch.testing.assert_close(model(x).detach(), out, rtol=0, atol=1e-12)
        balanced = torch.allclose(layer.up.weight.T @ layer.up.weight, layer.down.weight @ layer.down.weight.T,
                                  atol=1e-10)
        assert balanced == (step % 2 == 0), step  # Adam's next step unbalances them again
        assert (layer.up.weight in optimizer.state) == (method_state and step % 3 != 0)
