"""Adam's moments at a subspace switch: known answers for every policy with a real (non-permutation)
rotation, both moments and both sides, and the per-coordinate bias correction measured against
the global one.

Run as a script (``python tests/test_optim_moments.py``) to print the figures quoted in
docs/optimizers.md ("Moments after a subspace switch").
"""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.linalg.dct import dct_matrix
from rankwise.linalg.quant import blockwise_dequantize
from rankwise.optim import DCTAdamW, GaLoreAdamW, GaLoreAdamW8bit
from rankwise.optim.inner import BLOCK_SIZE

BETA1, BETA2 = 0.9, 0.999


def two_steps(optimizer_class, shape, policy, **keys):
    """Two steps of one weight with rank 3 and a refresh at each: returns the state, the two bases
    and the two projected gradients."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    optimizer = optimizer_class([{"params": [weight], "rank": 3, "update_proj_gap": 1, "moment_policy": policy,
                                  **keys}], lr=1e-2)
    grads = [torch.randn(*shape, generator=gen) for _ in range(2)]
    state = optimizer.state[weight]
    side = "proj_left" if shape[0] < shape[1] else "proj_right"
    bases, moments = [], []
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
        bases.append(state[side].clone())
        moments.append(float_moments(state))
    return state, bases, grads, moments, side


def float_moments(state) -> tuple[torch.Tensor, torch.Tensor]:
    if "exp_avg_codes" in state:
        m = blockwise_dequantize(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True, block_size=BLOCK_SIZE)
        root = blockwise_dequantize(state["exp_avg_sq_root_codes"], state["exp_avg_sq_root_absmax"], signed=False,
                                    block_size=BLOCK_SIZE)
        return m, root.square()
    return state["exp_avg"].clone(), state["exp_avg_sq"].clone()


def project(basis: torch.Tensor, grad: torch.Tensor, side: str) -> torch.Tensor:
    return basis.T @ grad if side == "proj_left" else grad @ basis


def carried(m, v, c, side, policy, squared_with=lambda c: c * c):
    """The moments carried into the new coordinates by ``policy`` (``C`` acts on rows for a left
    basis, on columns -- transposed -- for a right one)."""
    if policy == "keep":
        return m, v
    if policy == "reset":
        return torch.zeros_like(m), torch.zeros_like(v)
    if side == "proj_left":
        return c @ m, squared_with(c) @ v
    return m @ c.T, v @ squared_with(c).T


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["left", "right"])
@pytest.mark.parametrize("policy", ["keep", "reset", "rotate"])
def test_moments_at_a_switch_follow_each_policy(policy, shape):
    state, (first, second), grads, moments, side = two_steps(GaLoreAdamW, shape, policy)
    for basis, grad in zip((first, second), grads):  # the top-3 singular subspace of each gradient
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        top = u[:, :3] if side == "proj_left" else vh[:3].T
        torch.testing.assert_close(basis.abs(), top.abs(), rtol=0, atol=1e-5)
    c = second.T @ first  # C = L_new^T L_old (R_old^T R_new transposed on the right)
    assert (c.abs() > 0.05).sum() > 3  # a real rotation: not a (signed) permutation
    m1, v1 = moments[0]
    low1, low2 = project(first, grads[0], side), project(second, grads[1], side)
    torch.testing.assert_close(m1, (1 - BETA1) * low1)
    torch.testing.assert_close(v1, (1 - BETA2) * low1**2)
    m_carried, v_carried = carried(m1, v1, c, side, policy)
    expected_m = BETA1 * m_carried + (1 - BETA1) * low2
    expected_v = BETA2 * v_carried + (1 - BETA2) * low2**2
    torch.testing.assert_close(state["exp_avg"], expected_m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"], expected_v, rtol=1e-5, atol=1e-9)
    assert state.get("moment_origin", 0) == (1 if policy == "reset" else 0)  # reset restarts the bias correction
    if policy == "rotate":  # the test tells the second moment's C o C from C
        _, wrong = carried(m1, v1, c, side, policy, squared_with=lambda c: c)
        assert (BETA2 * wrong - BETA2 * v_carried).abs().max() > 100 * 1e-9


def test_quantised_moments_rotate_through_c_and_c_squared():
    """galore8bit dequantises, rotates and requantises: the stored moments are the float
    answer up to the 8-bit error, which is far below the difference C o C makes."""
    state, (first, second), grads, moments, side = two_steps(GaLoreAdamW8bit, (6, 10), "rotate", min_8bit_size=0)
    c = second.T @ first
    m1, v1 = moments[0]
    low2 = project(second, grads[1], side)
    m_rot, v_rot = carried(m1, v1, c, side, "rotate")
    got_m, got_v = float_moments(state)
    expected_m, expected_v = BETA1 * m_rot + (1 - BETA1) * low2, BETA2 * v_rot + (1 - BETA2) * low2**2
    m_error = (got_m - expected_m).abs().max()
    v_error = (got_v - expected_v).abs().max()
    assert m_error < 0.02 * expected_m.abs().max() and v_error < 0.02 * expected_v.abs().max()
    _, wrong = carried(m1, v1, c, side, "rotate", squared_with=lambda c: c)
    assert (BETA2 * (wrong - v_rot)).abs().max() > 5 * v_error


# ----- per-coordinate bias correction ---------------------------------------------------------

ROWS, SIZE = 30, 16
AFTER = (2, 12, 9)  # column 12 enters the subspace, 5 leaves, 2 and 9 stay


def constant_gradient(columns, strengths, seed: int = 0) -> torch.Tensor:
    q = dct_matrix(SIZE)
    gen = torch.Generator().manual_seed(seed)
    grad = torch.zeros(ROWS, SIZE)
    for column, strength in zip(columns, strengths):
        grad += strength * torch.randn(ROWS, 1, generator=gen).sign() * q[:, column].unsqueeze(0)
    return grad


def switching_gradients() -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients on DCT columns 2, 5, 9 (strengths 3, 2, 1), then on 2, 12, 9: the kept columns'
    part is the same tensor in both."""
    kept = constant_gradient((2, 9), (3.0, 1.0))
    return kept + constant_gradient((5,), (2.0,), seed=1), kept + constant_gradient((12,), (2.0,), seed=2)


def update_ratios(bias_correction: str, before: int = 300, after: int = 500) -> list[float]:
    """DCT-AdamW (refresh every step, rotate) on constant gradients; after ``before`` steps one
    column is replaced. Returns, for each later step k = 1..after, the size of the new column's
    update divided by that of the columns kept (1 = a fresh start's size)."""
    weight = torch.nn.Parameter(torch.zeros(ROWS, SIZE))
    optimizer = DCTAdamW([{"params": [weight], "rank": 3, "bias_correction": bias_correction}], lr=1e-3)
    old, new = switching_gradients()
    q = dct_matrix(SIZE)
    for _ in range(before):
        weight.grad = old.clone()
        optimizer.step()
    ratios = []
    for _ in range(after):
        start = weight.detach().clone()
        weight.grad = new.clone()
        optimizer.step()
        moved = (weight.detach() - start) @ q  # per DCT column
        assert optimizer.state[weight]["proj_right_indices"].tolist() == list(AFTER)
        kept = (moved[:, 2].norm() + moved[:, 9].norm()) / 2
        ratios.append((moved[:, 12].norm() / kept).item())
    return ratios


def new_coordinate_ratio(k: int, t: int) -> float:
    """The update of a coordinate whose moments started k steps ago, at global step t, relative to
    one that saw all t steps (constant gradient): [(1 - b1^k) / sqrt(1 - b2^k)] * [sqrt(1 - b2^t) / (1 - b1^t)]."""
    return (1 - BETA1**k) / math.sqrt(1 - BETA2**k) * math.sqrt(1 - BETA2**t) / (1 - BETA1**t)


def test_global_correction_inflates_new_coordinates_and_per_coordinate_does_not():
    before = 300
    global_ratios = update_ratios("global", before)
    per_coordinate = update_ratios("per_coordinate", before)
    for k in (1, 10, 100, 400):
        assert global_ratios[k - 1] == pytest.approx(new_coordinate_ratio(k, before + k), rel=1e-3)
    assert max(global_ratios) > 3 and global_ratios[199] > 1.4  # several times too large for hundreds of steps
    assert all(abs(r - 1) < 1e-3 for r in per_coordinate), max(per_coordinate, key=lambda r: abs(r - 1))


def test_history_weights_after_a_rotate_switch():
    """Kept columns carry the global correction 1 - b^t, the new one starts at 0 (C o C on 0/1 C)."""
    weight = torch.nn.Parameter(torch.zeros(ROWS, SIZE))
    optimizer = DCTAdamW([{"params": [weight], "rank": 3, "bias_correction": "per_coordinate"}], lr=1e-3)
    old, new = switching_gradients()
    for _ in range(4):
        weight.grad = old.clone()
        optimizer.step()
    state = optimizer.state[weight]
    for key, beta in (("exp_avg_weight", BETA1), ("exp_avg_sq_weight", BETA2)):  # same columns: the global one
        torch.testing.assert_close(state[key], torch.full((1, 3), 1 - beta**4))
    weight.grad = new.clone()
    optimizer.step()
    new_column = list(AFTER).index(12)
    for key, beta in (("exp_avg_weight", BETA1), ("exp_avg_sq_weight", BETA2)):
        expected = torch.full((1, 3), 1 - beta**5)  # 4 steps carried, then this step's update
        expected[0, new_column] = 1 - beta
        torch.testing.assert_close(state[key], expected)


AGE_BUCKETS = ((1, 1), (2, 5), (6, 20), (21, 10**9))


def llama_update_by_age(bias_correction: str, steps: int = 3000, measure_from: int = 2000, lr: float = 1e-3
                        ) -> dict[tuple[int, int], tuple[float, float]]:
    """DCT-AdamW with its defaults (rank 8, a new selection every step, rotate) on the tiny LLaMA,
    steps ``measure_from`` to ``steps`` (``t >> 1 / (1 - beta2)``: the global correction is ~1):
    by the age of a selected column in the subspace, its update's RMS per entry divided by lr
    (a fresh Adam start is 1, sign-sized) and the share of the selections of that age."""
    from conftest import make_batch, make_llama

    from rankwise import optim

    model = make_llama()
    optimizer = optim.build(model, "dct", lr=lr, rank=8, bias_correction=bias_correction)
    weights = [p for _, p in optim.split_parameters(model)[0]]
    ages: dict[int, dict[int, int]] = {id(w): {} for w in weights}
    sums = {bucket: [0.0, 0] for bucket in AGE_BUCKETS}
    for step in range(steps):
        starts = [w.detach().clone() for w in weights]
        model(**make_batch(seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for weight, start in zip(weights, starts):
            state = optimizer.state[weight]
            side = "left" if "proj_left_indices" in state else "right"
            indices = state[f"proj_{side}_indices"].tolist()
            q = dct_matrix(min(weight.shape))
            moved = weight.detach() - start
            per_column = (q.T @ moved).norm(dim=1) if side == "left" else (moved @ q).norm(dim=0)
            entries = max(weight.shape)
            previous = ages[id(weight)]
            ages[id(weight)] = {i: previous.get(i, 0) + 1 for i in indices}
            if step < measure_from:
                continue
            for i in indices:
                bucket = next(b for b in AGE_BUCKETS if b[0] <= ages[id(weight)][i] <= b[1])
                sums[bucket][0] += per_column[i].item() / math.sqrt(entries) / lr
                sums[bucket][1] += 1
    total = sum(count for _, count in sums.values())
    return {bucket: (sums[bucket][0] / sums[bucket][1], sums[bucket][1] / total) for bucket in AGE_BUCKETS}


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    for mode in ("global", "per_coordinate"):
        ratios = update_ratios(mode, before=5000)
        picks = ", ".join(f"k={k}: {ratios[k - 1]:.2f}" for k in (1, 5, 10, 20, 50, 100, 200, 500))
        print(f"constant gradients, t = 5000, {mode:>14}: max {max(ratios):.2f} at k={ratios.index(max(ratios)) + 1}; "
              f"{picks}")
    for mode in ("global", "per_coordinate"):
        by_age = llama_update_by_age(mode)
        print(f"tiny LLaMA, DCT defaults, {mode:>14}, update RMS / lr by age in the subspace: " + ", ".join(
            f"{low}{'+' if high > 10**8 else f'-{high}'} ({share:.0%}): {size:.2f}"
            for (low, high), (size, share) in by_age.items()))
