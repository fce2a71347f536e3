"""Quantisation math (rankwise.linalg.quant), galore8bit and qgalore on constructed inputs and oracles."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import make_batch, make_llama

from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.linalg import quant
from rankwise.optim import GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit
from rankwise.optim.inner import AdamMoments
from rankwise.optim.inner import QuantizedAdamMoments
from rankwise.optim.qgalore import int8_weight

# ----------------------------------------------------------------- codebooks and round trips


def test_dynamic_codebooks_have_the_tree_structure():
    signed, unsigned = quant.dynamic_codebook(True), quant.dynamic_codebook(False)
    assert signed.numel() == 255 and unsigned.numel() == 256
    assert torch.equal(signed, -signed.flip(0)) and signed.max() == 1 and (signed == 0).sum() == 1
    assert unsigned.min() == 0 and unsigned.max() == 1 and torch.all(unsigned[1:] > unsigned[:-1])
    # 2^(B-1-E) codes in the decade (10^-(E+1), 10^-E]: 64, 32, ... for signed; 128, 64, ... unsigned
    for book, top in ((signed[signed > 0], 64), (unsigned[unsigned > 0], 128)):
        counts = [int(((book > 10.0 ** -(e + 1)) & (book <= 10.0**-e * (1 + 1e-6))).sum()) for e in range(6)]
        assert counts == [top >> e for e in range(6)]


def spread_tensor(numel: int, signed: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    scales = torch.logspace(-5, 0, numel)[torch.randperm(numel, generator=generator)]
    values = torch.rand(numel, generator=generator) * scales
    if signed:
        values = values * torch.where(torch.rand(numel, generator=generator) < 0.5, -1.0, 1.0)
    values[::97] = 0.0
    return values.view(-1, 10)


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_rounds_to_the_nearest_code_of_each_block(signed):
    x = spread_tensor(1000, signed)  # 4 blocks, the last one partial
    codes, absmax = quant.blockwise_quantize(x, signed=signed, block_size=256)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and absmax.shape == (4,)
    assert codes.untyped_storage().nbytes() == 1000  # no padding kept
    back = quant.blockwise_dequantize(codes, absmax, signed=signed, block_size=256)
    book = quant.dynamic_codebook(signed)
    scale = absmax.repeat_interleave(256)[:1000].view_as(x)
    normalised = x / scale
    nearest = (normalised.unsqueeze(-1) - book).abs().min(dim=-1).values
    assert torch.all((normalised - back / scale).abs() <= nearest + 1e-6)
    assert torch.all(back[x == 0] == 0) and torch.all(back * x >= 0)  # zeros exact, signs kept
    top = x.abs() >= 0.1 * scale  # top decade: half of a 0.9 / 2^F gap
    bound = 0.45 / (64 if signed else 128)
    assert torch.all((back - x).abs()[top] <= bound * scale[top] * (1 + 1e-5))
    flat_abs = x.abs().reshape(-1)
    for block in range(4):  # each block's absmax is exact
        chunk = slice(256 * block, min(256 * (block + 1), 1000))
        peak = flat_abs[chunk].argmax() + chunk.start
        assert back.reshape(-1)[peak] == x.reshape(-1)[peak]


@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_error_is_at_most_half_a_step(bits):
    x = spread_tensor(1000, True) * 3 + 0.5
    x[-50:] = 0.25  # a constant tail inside the partial last group
    codes, low, step = quant.minmax_quantize(x, bits=bits, group_size=64)
    groups = math.ceil(1000 / 64)
    assert low.shape == step.shape == (groups,) and codes.dtype == torch.uint8
    assert codes.numel() == quant.packed_bytes(1000, bits) == (500 if bits == 4 else 1000)
    back = quant.minmax_dequantize(codes, low, step, bits=bits, group_size=64, shape=x.shape)
    per_element_step = step.repeat_interleave(64)[:1000].view_as(x)
    assert torch.all((back - x).abs() <= per_element_step / 2 + 1e-6)
    rows = x.reshape(-1)[: 64 * 15].view(15, 64)
    flat_back = back.reshape(-1)[: 64 * 15].view(15, 64)
    assert torch.equal(flat_back.amin(1), rows.amin(1))  # the minimum is stored exactly
    torch.testing.assert_close(flat_back.amax(1), rows.amax(1), rtol=1e-6, atol=1e-6)
    assert torch.all(back[-40:] == 0.25)  # constant group: step 0, exact


def test_stochastic_rounding_is_unbiased_and_keeps_small_updates():
    # Each group of 16 spans [0, 1] (so the 4-bit step is 1/15) and holds 14 copies of w.
    w = 0.3 + 0.004  # 4.56 steps: between two codes; +0.004 is well below half a step
    groups = torch.full((4000, 16), w)
    groups[:, 0], groups[:, -1] = 0.0, 1.0
    codes, low, step = quant.minmax_quantize(groups, bits=4, group_size=16, generator=torch.Generator().manual_seed(0))
    back = quant.minmax_dequantize(codes, low, step, bits=4, group_size=16, shape=groups.shape)[:, 1:-1]
    lower, upper = (back - 4 / 15).abs() < 1e-6, (back - 5 / 15).abs() < 1e-6
    assert torch.all(lower | upper) and lower.any() and upper.any()  # only the two neighbouring codes
    standard_error = (1 / 15) * 0.5 / math.sqrt(back.numel())
    assert abs(back.mean().item() - w) < 4 * standard_error  # E[SR(w)] = w
    rounded = quant.minmax_quantize(groups, bits=4, group_size=16)
    nearest = quant.minmax_dequantize(*rounded, bits=4, group_size=16, shape=groups.shape)
    assert torch.allclose(nearest[:, 1:-1], torch.tensor(5 / 15))  # round-to-nearest: biased by 0.029


# ----------------------------------------------------------------- galore8bit


def projected_only(model):
    projected, others = optim.split_parameters(model)
    for p in others:
        p.requires_grad_(False)
    return [p for _, p in projected]


def train(model, optimizer, steps, first=0):
    for i in range(first, first + steps):
        model(**make_batch(seed=i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def relative_gap(ours, reference, initial):
    gap = sum(((a - b) ** 2).sum() for a, b in zip(ours, reference)).sqrt()
    moved = sum(((b - c) ** 2).sum() for b, c in zip(reference, initial)).sqrt()
    return (gap / moved).item()


KEYS = {"rank": 8, "update_proj_gap": 100, "scale": 0.25, "proj_type": "std"}


def test_first_step_is_adams_first_step_in_the_svd_subspace_and_moments_are_4x_smaller():
    """The first update comes from the float moments, so it is the known answer
    W - lr sqrt(1 - b2) / (1 - b1) * scale * (0.1 R / (sqrt(0.001) |R| + eps)) Q^T, then the decoupled
    decay (bitsandbytes' defaults eps 1e-8, weight_decay 0.01); the moments are stored as 8-bit codes."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32, generator=gen))  # m >= n: right basis, moments 64 x 8
    grad = torch.randn(64, 32, generator=gen)
    start = weight.detach().clone()
    lr = 1e-2
    optimizer = GaLoreAdamW8bit([{"params": [weight], **KEYS}], lr=lr, min_8bit_size=0)
    weight.grad = grad.clone()
    optimizer.step()
    right = torch.linalg.svd(grad, full_matrices=False).Vh[:8].T
    low = grad @ right
    direction = 0.1 * low / (math.sqrt(0.001) * low.abs() + 1e-8)
    stepped = start - lr * math.sqrt(0.001) / 0.1 * 0.25 * direction @ right.T
    torch.testing.assert_close(weight.detach(), stepped * (1 - lr * 1e-2), rtol=1e-5, atol=1e-6)
    state = optimizer.state[weight]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_codes"].shape == (64, 8)
    moment_bytes = sum(v.untyped_storage().nbytes() for k, v in state.items() if k.startswith("exp_avg"))
    float_bytes = 2 * 64 * 8 * 4
    assert moment_bytes == 2 * 512 + 2 * 4 * 2 and float_bytes / moment_bytes > 3.9


def test_trajectory_matches_bitsandbytes_within_the_quantisation_error(monkeypatch):
    """galore-torch's GaLoreAdamW8bit runs on CPU once its torch.cuda.synchronize() is a no-op.
    Without refreshes after the first step, trajectories differ by the moments' quantisation only:
    the reference itself drifts ~1.6 % from fp32 Adam in 6 steps (of the distance moved)."""
    galore_torch = pytest.importorskip("galore_torch")
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    ours, theirs, full = make_llama(), make_llama(), make_llama()
    options = {"lr": 1e-2, "eps": 1e-8, "weight_decay": 0.0, "min_8bit_size": 0}
    ours_params, theirs_params, full_params = projected_only(ours), projected_only(theirs), projected_only(full)
    ours_opt = GaLoreAdamW8bit([{"params": ours_params, **KEYS}], **options)
    theirs_opt = galore_torch.GaLoreAdamW8bit([{"params": theirs_params, **KEYS}], **options)
    full_opt = GaLoreAdamW([{"params": full_params, **KEYS}], lr=1e-2, eps=1e-8)
    for model, optimizer in ((ours, ours_opt), (theirs, theirs_opt), (full, full_opt)):
        train(model, optimizer, 6)
    assert theirs_opt.state[theirs_params[0]]["state1"].dtype == torch.uint8  # the oracle really ran 8-bit
    initial = projected_only(make_llama())
    reference_drift = relative_gap(theirs_params, full_params, initial)
    assert 0.005 < reference_drift < 0.03
    assert relative_gap(ours_params, full_params, initial) < 2 * reference_drift
    assert relative_gap(ours_params, theirs_params, initial) < 3 * reference_drift


def test_second_moment_keeps_tiny_coordinates_finite():
    """A block spanning 5 decades: v = g^2 spans 10, below the map's 1e-7 floor; storing sqrt(v)
    keeps each coordinate's Adam step within the (coarse, bottom-decade) quantisation error."""
    grad = torch.logspace(-5, 0, 256).view(16, 16)
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 1.0, "correct_bias": True, "min_8bit_size": 0}
    quantised, full = {"step": 0}, {"step": 0}
    for g in (grad, torch.zeros_like(grad)):  # the second step is momentum only
        quantised["step"] += 1
        full["step"] += 1
        q_dir, _ = QuantizedAdamMoments().update(quantised, g, group)
        f_dir, _ = AdamMoments().update(full, g, group)
    ratio = q_dir / f_dir  # float Adam: ~2.8 everywhere; with v on the map, tiny coordinates get ~m / eps ~ 1e2
    assert torch.all((ratio > 0.4) & (ratio < 1.6)) and (ratio - 1).abs().mean() < 0.1


def test_rotating_quantised_moments():
    state = {"step": 0}
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 1.0, "correct_bias": True, "min_8bit_size": 0}
    inner = QuantizedAdamMoments()
    for seed in range(3):
        state["step"] += 1
        inner.update(state, torch.randn(4, 300, generator=torch.Generator().manual_seed(seed)), group)
    codes = {k: v.clone() for k, v in state.items() if k.endswith("_codes")}
    inner.rotate(state, torch.eye(4), None, group)  # same subspace, same coordinates: requantising is idempotent
    assert all(torch.equal(state[k], v) for k, v in codes.items())
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))
    before = QuantizedAdamMoments._float_view(state, torch.float32)
    inner.rotate(state, flip, None, group)
    after = QuantizedAdamMoments._float_view(state, torch.float32)
    torch.testing.assert_close(after["exp_avg"], flip @ before["exp_avg"])
    torch.testing.assert_close(after["exp_avg_sq"], before["exp_avg_sq"])


def test_min_8bit_size_applies_to_both_groups_and_is_validated():
    model = make_llama()
    optimizer = optim.build(model, "galore8bit", lr=1e-2, rank=4, min_8bit_size=100)
    assert [g["min_8bit_size"] for g in optimizer.param_groups] == [100, 100]
    train(model, optimizer, 1)
    norm = model.model.norm.weight  # 32 numbers: float32 moments
    assert optimizer.state[norm]["exp_avg"].dtype == torch.float32
    assert optimizer.state[model.lm_head.weight]["exp_avg_codes"].dtype == torch.uint8
    with pytest.raises(RankwiseError, match="min_8bit_size must be an integer >= 0"):
        optim.build(make_llama(), "galore8bit", lr=1e-2, rank=4, min_8bit_size=-1)


# ----------------------------------------------------------------- qgalore


def constructed_gradients(directions: list[torch.Tensor], m: int = 8, n: int = 16) -> list[torch.Tensor]:
    """Rank-one-dominated m x n gradients whose top left singular vector is the given direction."""
    generator = torch.Generator().manual_seed(0)
    right = torch.randn(n, generator=generator)
    return [10 * torch.outer(d, right) + 0.01 * torch.randn(m, n, generator=generator) for d in directions]


def refresh_steps(gradients: list[torch.Tensor], **keys) -> tuple[list[int], QGaLoreAdamW8bit, torch.nn.Parameter]:
    weight = torch.nn.Parameter(torch.zeros(8, 16))
    optimizer = QGaLoreAdamW8bit(
        [{"params": [weight], "rank": 2, "update_proj_gap": 1, "queue_size": 3, "quant_group_size": 8, **keys}], lr=1e-3
    )
    refreshed, last = [], None
    for step, grad in enumerate(gradients):
        weight.grad = grad
        optimizer.step()
        codes = optimizer.state[weight]["proj_left_codes"]
        if codes is not last:
            refreshed.append(step)
        last = codes
    return refreshed, optimizer, weight


def test_lazy_refresh_doubles_the_gap_once_the_subspace_settles():
    e = torch.eye(8)
    steady = constructed_gradients([e[0]] * 20)  # the same top singular vector every time: |cos| ~ 1
    refreshed, optimizer, weight = refresh_steps(steady)
    # window of 3 full after the 4th refresh (step 3): gap 1 -> 2 -> 4 -> 8 -> 16, refreshing at the
    # multiples of the current gap (the reference's iter % update_proj_gap == 0)
    assert refreshed == [0, 1, 2, 3, 4, 8, 16]
    state = optimizer.state[weight]
    assert state["proj_gap"] == 16 and state["proj_cos_count"] == 6
    assert torch.all(state["proj_cos_window"] > 0.99)
    first = optimizer.projector.basis(state, weight).left[:, 0]
    assert abs(first @ e[0]).item() > 0.98  # the INT4 basis still points along the singular vector

    alternating = constructed_gradients([e[i % 2] for i in range(12)])  # orthogonal switches: cos 0
    refreshed, optimizer, weight = refresh_steps(alternating)
    assert refreshed == list(range(12)) and optimizer.state[weight]["proj_gap"] == 1
    assert torch.all(optimizer.state[weight]["proj_cos_window"] < 0.1)  # 0 up to the INT4 error of u_old


def test_threshold_and_gamma_control_the_schedule():
    e = torch.eye(8)
    steady = constructed_gradients([e[0]] * 12)
    assert refresh_steps(steady, cos_threshold=1.0)[0] == list(range(12))  # |cos| stays just below 1
    assert refresh_steps(steady, gamma_proj=3)[0] == [0, 1, 2, 3, 6, 9]


def test_int4_projector_state_and_accuracy():
    model = make_llama()
    optimizer = optim.build(model, "qgalore", lr=1e-2, rank=8, quant_group_size=64)
    train(model, optimizer, 1)
    weight = model.model.layers[0].mlp.down_proj.weight  # 32 x 64: left basis 32 x 8
    state = optimizer.state[weight]
    assert state["proj_left_codes"].dtype == torch.uint8 and state["proj_left_codes"].numel() == 128  # 4 bits
    assert state["proj_left_min"].shape == state["proj_left_step"].shape == (4,)
    basis = optimizer.projector.basis(state, weight).left
    step = state["proj_left_step"].repeat_interleave(64).view(32, 8)
    assert torch.all(step <= 2 / 15 + 1e-6)  # a unit vector's entries span at most [-1, 1]
    assert torch.linalg.matrix_norm(basis.T @ basis - torch.eye(8)) < 0.5  # close to orthonormal


def test_unquantised_qgalore_with_a_long_window_matches_galore_torch():
    """With float projectors, float moments and a window that never fills, Q-GaLore is GaLore:
    the galore-torch oracle's trajectory (refreshes at steps 0, 2, 4)."""
    galore_torch = pytest.importorskip("galore_torch")
    keys = {"rank": 8, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}
    ours, reference = make_llama(), make_llama()
    unquantised = {"quant": False, "queue_size": 1000, "min_8bit_size": 10**9}
    ours_opt = optim.build(ours, "qgalore", lr=1e-2, eps=1e-6, weight_decay=0.0, **unquantised, **keys)
    projected, others = optim.split_parameters(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reference_opt = galore_torch.GaLoreAdamW(
            [{"params": [p for _, p in projected], **keys}, {"params": others}], lr=1e-2, eps=1e-6, weight_decay=0.0
        )
    train(ours, ours_opt, 5)
    train(reference, reference_opt, 5)
    start = make_llama()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), start.parameters()))


def test_int8_weights_are_the_parameters_values():
    model = make_llama()
    optimizer = optim.build(model, "qgalore", lr=1e-2, rank=4, min_8bit_size=0, weight_quant=True)
    train(model, optimizer, 3)
    weight = model.model.layers[1].self_attn.v_proj.weight
    state = optimizer.state[weight]
    assert state["weight_codes"].dtype == torch.uint8 and state["weight_codes"].numel() == weight.numel()
    assert state["weight_min"].shape == (4,)  # 1024 numbers / 256 per group
    assert torch.equal(int8_weight(optimizer, weight), weight.detach())  # forward uses the INT8 values
    for group in weight.detach().reshape(4, 256):
        assert torch.unique(group).numel() <= 256
    norm = model.model.norm.weight
    assert "weight_codes" not in optimizer.state[norm]  # only the projected group is quantised
    with pytest.raises(RankwiseError, match="no INT8 weight yet"):
        int8_weight(optimizer, norm)


def sub_step_run(**keys) -> torch.Tensor:
    """Displacement of a 16 x 64 weight (values in [0, 1]) after 30 identical steps."""
    weight = torch.nn.Parameter(torch.rand(16, 64, generator=torch.Generator().manual_seed(0)))
    start = weight.detach().clone()
    optimizer = QGaLoreAdamW8bit(
        [{"params": [weight], "rank": 4, "update_proj_gap": 1000, "min_8bit_size": 0, **keys}],
        lr=1e-3,
        weight_decay=0.0,
    )
    grad = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(30):
        weight.grad = grad.clone()
        optimizer.step()
    return (weight.detach() - start).reshape(-1)


def test_int8_stochastic_rounding_keeps_sub_step_updates():
    exact = sub_step_run(weight_quant=False)
    half_step = 0.5 / 255  # INT8 groups spanning [0, 1]
    assert exact.abs().mean() / 30 < 0.1 * half_step  # each update alone would round away
    stochastic = sub_step_run(weight_quant=True)
    nearest = sub_step_run(weight_quant=True, stochastic_round=False)
    along = lambda moved: (moved @ exact / (exact @ exact)).item()  # noqa: E731  component along the float path
    assert 0.8 < along(stochastic) < 1.2  # unbiased: the weights follow the float trajectory on average
    assert abs(along(nearest)) < 0.1  # round-to-nearest loses the updates


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"quant_n_bit": 3}, "option quant_n_bit must be one of 4, 8"),
        ({"gamma_proj": 0.5}, "gamma_proj must be a number >= 1"),
        ({"cos_threshold": 1.5}, r"cos_threshold must be a number in \[0, 1\]"),
        ({"queue_size": 0}, "queue_size must be an integer >= 1"),
        ({"quant_group_size": 2.5}, "quant_group_size must be an integer >= 1"),
        ({"weight_quant": "yes"}, "weight_quant must be True or False"),
        ({"min_8bit_size": -5}, "min_8bit_size must be an integer >= 0"),
        ({"update_proj_gap": 0}, "update_proj_gap must be an integer >= 1"),
    ],
)
def test_qgalore_bad_input_raises_before_anything_changes(hparams, message):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        optim.build(model, "qgalore", lr=1e-3, rank=4, **hparams)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("galore8bit", {"min_8bit_size": 0, "moment_policy": "rotate"}),
        ("qgalore", {"min_8bit_size": 0, "weight_quant": True, "moment_policy": "rotate"}),
        ("fira", {}),
    ],
)
def test_bf16_weights_keep_their_dtype_and_stay_finite(name, hparams):
    model = make_llama().to(torch.bfloat16)
    optimizer = optim.build(model, name, lr=1e-2, rank=4, update_proj_gap=1, **hparams)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    train(model, optimizer, 3)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16 and not torch.equal(weight, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
