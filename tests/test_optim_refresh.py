"""Subspace refresh modes (svd / randomized / warm) and the batched refresh of SVD projectors.

Known answers on matrices with a constructed spectrum (captured energy against the exact
top-r, warm start converging to the exact subspace), batched decompositions equal to
per-matrix ones, the optimizer's batched step equal to stepping parameters one by one, and
exact resume in every mode for every SVD-based optimizer.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_llama
from test_optim import roundtrip, train

from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.linalg import captured_energy, randomized_svd, warm_svd
from rankwise.linalg.projections import singular_bases

SVD_OPTIMIZERS = [
    ("galore", {"rank": 4}),
    ("galore8bit", {"rank": 4}),
    ("fira", {"rank": 4}),
    ("gradnorm_lorp", {"rank": 4}),
    ("qgalore", {"rank": 4}),
    ("apollo", {"rank": 4, "proj": "svd"}),
    ("frugal", {"proj": "svd"}),
]
MODES = ("svd", "randomized", "warm")


def with_spectrum(singular_values: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """``U diag(s) V^T`` with Haar-random orthonormal ``U`` (m x k), ``V`` (n x k)."""
    generator = torch.Generator().manual_seed(seed)
    k = singular_values.numel()
    u = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))[0]
    return (u * singular_values) @ v.T


def projector_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||A A^T - B B^T||_2`` (sine of the largest principal angle) of two orthonormal bases."""
    return torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2).item()


# ----- linalg: known answers ----------------------------------------------------------------


def test_randomized_range_finder_is_exact_on_a_matrix_of_rank_r():
    s = torch.linspace(10, 1, 8, dtype=torch.float64)
    matrix = with_spectrum(s, 60, 90)
    u, found, _ = randomized_svd(matrix, 8, niter=0, oversample=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(found, s, rtol=1e-10, atol=0)
    assert captured_energy(matrix, u).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("niter", [0, 1, 2])
def test_randomized_captured_energy_meets_the_halko_bound(niter):
    """Geometric spectrum 0.8^i: the rank-r error ``||W - Q Q^T W||_2`` is at most
    ``(1 + 9 sqrt(k min(m, n)))^(1/(2q+1)) s_{r+1}`` (Halko et al. Thm 10.6, in expectation;
    the factor 10 covers one draw), and the energy grows with the power iterations."""
    m, n, r, p = 80, 120, 10, 5
    s = 0.8 ** torch.arange(m, dtype=torch.float64)
    matrix = with_spectrum(s, m, n)
    u, _, _ = randomized_svd(matrix, r, niter=niter, oversample=p, generator=torch.Generator().manual_seed(2))
    basis = torch.linalg.qr(u)[0]
    error = torch.linalg.matrix_norm(matrix - basis @ (basis.T @ matrix), ord=2).item()
    bound = (1 + 9 * ((r + p) * m) ** 0.5) ** (1 / (2 * niter + 1)) * s[r].item()
    assert error <= 10 * bound
    energy = captured_energy(matrix, u, exact=s).item()
    assert 0.0 < energy <= 1.0 + 1e-12
    if niter == 2:
        assert energy >= 0.999


def test_warm_start_converges_to_the_exact_subspace():
    """Spectral gap s_r / s_{r+1} = 2: subspace iteration contracts the angle by (1/2)^2 per
    iteration, so 30 iterations from a rough start reach the exact top-r subspace."""
    m, n, r = 50, 70, 6
    s = torch.cat([torch.linspace(8, 4, r), torch.linspace(2, 0.1, 30)]).double()
    matrix = with_spectrum(s, m, n, seed=3)
    exact = torch.linalg.svd(matrix)[0][:, :r]
    rough = torch.linalg.qr(exact + 0.5 * torch.randn(m, r, generator=torch.Generator().manual_seed(4)).double())[0]
    assert projector_distance(rough, exact) > 0.1
    one, _, _ = warm_svd(matrix, rough, r, niter=1)
    many, found, _ = warm_svd(matrix, rough, r, niter=30)
    assert projector_distance(one, exact) < projector_distance(rough, exact)
    assert projector_distance(many, exact) < 1e-8
    torch.testing.assert_close(found, s[:r], rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sides", [(True, False), (False, True), (True, True)])
def test_batched_decomposition_equals_per_matrix(mode, sides):
    use_left, use_right = sides
    matrices = [torch.randn(24, 40, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    matrices.append(torch.randn(40, 24, generator=torch.Generator().manual_seed(9)))  # another shape
    previous = singular_bases([x + 0.1 for x in matrices], 5, use_left=use_left, use_right=use_right)
    options = dict(use_left=use_left, use_right=use_right, mode=mode, niter=1, oversample=3)
    together = singular_bases(matrices, 5, seeds=[7, 8, 9, 10], previous=previous, **options)
    for i, matrix in enumerate(matrices):
        alone = singular_bases([matrix], 5, seeds=[7 + i], previous=[previous[i]], **options)[0]
        for a, b in ((together[i].left, alone.left), (together[i].right, alone.right)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["randomized", "warm"])
def test_fast_refresh_captures_a_low_rank_gradient_plus_noise(mode):
    """A gradient that is rank 8 plus small noise: every mode captures >= 0.99 of the exact top-8."""
    signal = with_spectrum(torch.linspace(5, 1, 8).double(), 64, 96, seed=5).float()
    grad = signal + 1e-2 * torch.randn(64, 96, generator=torch.Generator().manual_seed(6))
    previous = singular_bases([signal], 8, use_left=True, use_right=False)
    basis = singular_bases([grad], 8, use_left=True, use_right=False, mode=mode, niter=1, seeds=[1],
                           previous=previous)[0]
    assert captured_energy(grad, basis.left).item() >= 0.99


# ----- optimizers ---------------------------------------------------------------------------


def make_wide_llama(seed: int = 0):
    return make_llama(seed=seed, layers=3)  # three same-shape copies of each projected weight


@pytest.mark.parametrize("mode", MODES)
def test_batched_step_equals_stepping_parameters_one_by_one(mode):
    batched_model, single_model = make_wide_llama(), make_wide_llama()
    keys = dict(lr=1e-2, rank=4, update_proj_gap=2, refresh=mode)
    batched = optim.build(batched_model, "galore", **keys)
    single = optim.build(single_model, "galore", **keys)
    sizes = []
    decompose = batched.projector.decompose
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batched.projector, "decompose", lambda items, group: sizes.append(len(items)) or
                      decompose(items, group))
        train(batched_model, batched, 5)
    assert max(sizes) == len(batched.param_groups[0]["params"])  # every due weight in one call

    class OneByOne:  # the layerwise path: each parameter refreshed on its own
        def step(self):
            for group in single.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        single.step_parameter(param, group)

        def zero_grad(self):
            single.zero_grad()

    train(single_model, OneByOne(), 5)
    for (name, a), b in zip(batched_model.named_parameters(), single_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,keys", SVD_OPTIMIZERS, ids=[n for n, _ in SVD_OPTIMIZERS])
def test_resume_is_exact_in_every_refresh_mode(name, keys, mode):
    options = dict(lr=1e-2, update_proj_gap=2, refresh=mode, **keys)
    straight = make_llama()
    straight_opt = optim.build(straight, name, **options)
    train(straight, straight_opt, 6)

    first = make_llama()
    first_opt = optim.build(first, name, **options)
    train(first, first_opt, 3)
    model_state, optim_state = roundtrip(first.state_dict()), roundtrip(first_opt.state_dict())
    resumed = make_llama(seed=123)
    resumed.load_state_dict(model_state)
    resumed_opt = optim.build(resumed, name, **options)
    resumed_opt.load_state_dict(optim_state)
    train(resumed, resumed_opt, 3, first_batch=3)
    for (pname, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=pname)


@pytest.mark.parametrize("mode", ["randomized", "warm"])
def test_fast_modes_capture_the_exact_energy_of_real_gradients(mode):
    """Two refreshes (the second warm-started from the first under ``warm``): each stored basis
    captures >= 0.99 of the exact top-r energy of the gradient it was computed from."""
    model = make_llama()
    opt = optim.build(model, "galore", lr=1e-2, rank=4, update_proj_gap=1, refresh=mode, refresh_niter=3)
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    for seed in range(2):
        model(**make_batch(seed=seed)).loss.backward()
        opt.step()
        for param in projected:
            state = opt.state[param]
            if "proj_left" in state:
                energy = captured_energy(param.grad, state["proj_left"])
            else:
                energy = captured_energy(param.grad.T, state["proj_right"])
            assert energy.item() >= 0.99
        opt.zero_grad()


def test_unknown_refresh_mode_names_the_accepted_ones():
    with pytest.raises(RankwiseError, match="randomized"):
        optim.build(make_llama(), "galore", lr=1e-2, rank=4, refresh="lanczos")


def test_add_back_equals_the_unfused_update_for_every_side_and_a_custom_basis():
    """``target += alpha L low R^T`` by addmm_ gives the same weights as adding ``project_back(low)``; a basis
    subclass with its own ``project_back`` (no factors) is honoured, not read as the identity."""
    from dataclasses import dataclass

    from rankwise.linalg.projections import Basis

    gen = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(12, 3, generator=gen, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(8, 3, generator=gen, dtype=torch.float64))[0]
    weight = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    for basis, low in [(Basis(left, None), torch.randn(3, 8, generator=gen, dtype=torch.float64)),
                       (Basis(None, right), torch.randn(12, 3, generator=gen, dtype=torch.float64)),
                       (Basis(left, right), torch.randn(3, 3, generator=gen, dtype=torch.float64))]:
        expected = weight + 0.3 * basis.project_back(low)
        torch.testing.assert_close(basis.add_back_(weight.clone(), low, 0.3), expected, rtol=0, atol=1e-14)

    @dataclass(frozen=True)
    class Doubling(Basis):
        def project_back(self, low):
            return 2 * low

    torch.testing.assert_close(Doubling(None, None).add_back_(weight.clone(), weight, 1.0), 3 * weight)
