"""The fast path of the decomposition-based adapter inits: batched SVDs over same-shape layers,
randomized SVDs, and the leading-columns QR / LDU, with the residual error init_report states.

Known answers on weights with a constructed spectrum: the exact init leaves exactly the tail
``sqrt(sum_{i>r} s_i^2) / ||W||_F`` in the base, the randomized one at most that plus the
stated tolerance, and the batched init equals the layer-by-layer one. OLoRA's and LoLDU's
first-``r`` factors equal those of the full QR / LU they replace.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import make_batch, make_llama

from rankwise import adapt, init_report
from rankwise.adapters import adapter_layers
from rankwise.adapters import corda, eva, gradient_family, rewrite
from rankwise.linalg.decompositions import ldu, signed_qr

# the module, not the function rankwise.linalg re-exports under the same name
svd_module = importlib.import_module("rankwise.linalg.svd")

BATCHED = ("pissa", "sorsa", "svfit")
RANK = 4


def spectral_llama(decay: float = 0.6):
    """A tiny LLaMA whose Linear weights have the singular values ``decay^i`` (times 1..2)."""
    model = make_llama()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                out, inp = module.weight.shape
                k = min(out, inp)
                u = torch.linalg.qr(torch.randn(out, k, generator=generator, dtype=torch.float64))[0]
                v = torch.linalg.qr(torch.randn(inp, k, generator=generator, dtype=torch.float64))[0]
                s = (1 + torch.rand(1, generator=generator, dtype=torch.float64)) * decay ** torch.arange(k)
                module.weight.copy_((u * s) @ v.T)
    return model


def tail_ratio(weight: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(weight.double())
    return (s[rank:].square().sum().sqrt() / s.square().sum().sqrt()).item()


@pytest.mark.parametrize("method", BATCHED)
def test_batched_init_equals_layer_by_layer(method):
    batched = adapt(spectral_llama(), method, rank=RANK)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rewrite, "prefetch_principal_triplets", lambda layers: None)  # each layer its own SVD
        single = adapt(spectral_llama(), method, rank=RANK)
    for (name, a), b in zip(batched.state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_batched_init_prefetches_every_same_shape_layer():
    model = spectral_llama()
    calls = []
    original = rewrite.truncated_svd
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rewrite, "truncated_svd", lambda m, *a, **k: calls.append(tuple(m.shape)) or original(m, *a, **k))
        adapt(model, "pissa", rank=RANK)
    assert calls and all(len(shape) == 3 for shape in calls)  # every SVD was a batch
    assert sum(shape[0] for shape in calls) == len(adapter_layers(model))


@pytest.mark.parametrize("method", BATCHED)
def test_exact_init_reports_the_tail_as_residual_error(method):
    original = {n: m.weight.detach().clone() for n, m in spectral_llama().named_modules()
                if isinstance(m, torch.nn.Linear)}
    model = adapt(spectral_llama(), method, rank=RANK)
    report = init_report(model)
    assert set(report["residual_error"]) == set(adapter_layers(model))
    for name, error in report["residual_error"].items():
        assert error == pytest.approx(tail_ratio(original[name], RANK), rel=1e-4)


@pytest.mark.parametrize("niter", [2, 4])
def test_randomized_init_is_within_the_stated_error_of_the_exact_one(niter):
    """Geometric spectrum 0.6^i: the randomized SVD (oversampling 10) leaves at most 0.1 % more
    in the base than the exact SVD, and its output at init still equals the base model's."""
    exact = init_report(adapt(spectral_llama(), "pissa", rank=RANK))["residual_error"]
    torch.manual_seed(1)
    model = spectral_llama()
    ids = torch.arange(12)[None]
    before = model(input_ids=ids).logits
    adapt(model, "pissa", rank=RANK, niter=niter)
    fast = init_report(model)["residual_error"]
    for name, error in fast.items():
        assert exact[name] <= error + 1e-7
        assert error <= exact[name] * 1.001
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-4)


# ----- OLoRA / LoLDU: the first r components without the full factorisation ----------------

SHAPES = [(24, 40), (40, 24), (32, 32)]


def full_signed_qr(weight):
    """The previous path: the full Householder QR, signs fixed so that diag(R) >= 0."""
    q, r = torch.linalg.qr(weight)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs, r * signs[:, None]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leading_qr_equals_the_first_columns_of_the_full_qr(shape, dtype):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    q_full, r_full = full_signed_qr(weight)
    for rank in (1, 5, min(shape)):
        q, r = signed_qr(weight, rank)
        assert q.dtype == r.dtype == dtype and q.shape == (shape[0], rank) and r.shape == (rank, shape[1])
        atol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(q, q_full[:, :rank], atol=atol, rtol=0)
        torch.testing.assert_close(r, r_full[:rank], atol=atol * 10, rtol=0)
        assert torch.count_nonzero(torch.tril(r, diagonal=-1)) == 0  # exactly triangular


def test_leading_qr_keeps_the_sign_convention_on_a_zero_column():
    weight = torch.randn(20, 12, generator=torch.Generator().manual_seed(4))
    weight[:, 1] = 0  # rank-deficient leading block: R[1, 1] = 0, its sign is taken as +1
    q, r = signed_qr(weight, 4)
    q_full, r_full = full_signed_qr(weight)
    assert (torch.diagonal(r) >= 0).all()
    torch.testing.assert_close(q @ r, q_full[:, :4] @ r_full[:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leading_ldu_equals_the_first_components_of_the_full_lu(shape, dtype):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    permutation, lower, upper = torch.linalg.lu(weight)  # the previous path
    pivots = torch.diagonal(upper)
    for rank in (1, 5, min(shape)):
        perm, low, d, unit_upper = ldu(weight, rank)
        atol = 1e-4 if dtype == torch.float32 else 1e-11
        torch.testing.assert_close(low[perm], (permutation @ lower)[:, :rank], atol=atol, rtol=0)
        torch.testing.assert_close(d, pivots[:rank], atol=atol, rtol=0)
        torch.testing.assert_close(unit_upper, (upper / pivots[:, None])[:rank], atol=atol, rtol=0)


@pytest.mark.parametrize("method", ["olora", "loldu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_leading_factor_inits_keep_the_output_and_report_the_residual(method, dtype):
    """On every Linear of the LLaMA, in each weight dtype: the output at init is the base model's
    and init_report's residual is ||W - offset|| / ||W|| of the full factorisation's first r components."""
    model = spectral_llama().to(dtype)
    original = {n: m.weight.detach().float().clone() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)}
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    adapt(model, method, rank=RANK, alpha=2 * RANK)
    with torch.no_grad():
        after = model(input_ids=ids).logits.float()
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float64: 1e-4}[dtype]
    torch.testing.assert_close(after, before, atol=tolerance, rtol=0)
    report = init_report(model)["residual_error"]
    assert set(report) == set(adapter_layers(model))
    for name, error in report.items():
        weight = original[name]
        if method == "olora":
            q, r = full_signed_qr(weight)
            offset = 2.0 * q[:, :RANK] @ r[:RANK]
        else:
            permutation, lower, upper = torch.linalg.lu(weight)
            offset = (permutation @ lower)[:, :RANK] @ upper[:RANK]
        expected = ((weight - offset).norm() / weight.norm()).item()
        # bf16 weights keep bf16 factors: their offset is rounded to 8 bits of mantissa
        assert error == pytest.approx(expected, rel=1e-2 if dtype == torch.bfloat16 else 1e-4, abs=1e-6), name


# ----- data-driven inits: batched context / gradient SVDs ------------------------------------

#: (id, method, options): the inits whose per-layer SVDs run batched over same-shape layers
DATA_BATCHED = [
    ("corda-ipm", "corda", {"mode": "ipm"}),
    ("corda-kpm", "corda", {"mode": "kpm"}),
    ("lora_ga", "lora_ga", {}),
    ("lora_sb", "lora_sb", {}),
    ("lora_sb-rewrite", "lora_sb", {"start_from_update": False, "update": "sgd"}),
]


def calibration():
    return [make_batch(seed=10 + i) for i in range(2)]


@pytest.mark.parametrize("method, options", [row[1:] for row in DATA_BATCHED], ids=[row[0] for row in DATA_BATCHED])
def test_batched_data_init_equals_layer_by_layer(method, options):
    data = calibration()
    batched = adapt(spectral_llama(), method, rank=RANK, data=data, **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rewrite, "same_shape_chunks", lambda *a: iter(()))  # each layer its own decomposition
        single = adapt(spectral_llama(), method, rank=RANK, data=data, **options)
    for (name, a), b in zip(batched.state_dict().items(), single.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("method, options, module, functions", [
    ("corda", {"mode": "ipm"}, corda, ("truncated_svd",)),
    ("corda", {"mode": "kpm"}, corda, ("svd",)),
    ("lora_ga", {}, gradient_family, ("truncated_svd",)),
])
def test_data_inits_decompose_every_same_shape_layer_in_a_batch(method, options, module, functions):
    model = spectral_llama()
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        for function in functions:
            original = getattr(module, function)
            patch.setattr(module, function,
                          lambda m, *a, original=original, **k: calls.append(tuple(m.shape)) or original(m, *a, **k))
        adapt(model, method, rank=RANK, data=calibration(), **options)
    assert calls and all(len(shape) == 3 for shape in calls)  # every SVD was a batch
    assert sum(shape[0] for shape in calls) == len(adapter_layers(model))


@pytest.mark.parametrize("method, options", [row[1:] for row in DATA_BATCHED], ids=[row[0] for row in DATA_BATCHED])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_batched_data_init_keeps_the_output_in_every_weight_dtype(method, options, dtype):
    model = spectral_llama().to(dtype)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    adapt(model, method, rank=RANK, data=calibration(), **options)
    with torch.no_grad():
        after = model(input_ids=ids).logits.float()
    if options.get("start_from_update", True) is False or method != "lora_sb":  # lora_sb starts from W + dW_1
        torch.testing.assert_close(after, before, atol=0.1 if dtype == torch.bfloat16 else 1e-6, rtol=0)
    assert torch.isfinite(after).all()
    layers = adapter_layers(model)
    assert all(layer.base.weight.dtype == dtype for layer in layers.values())
    if layers[next(iter(layers))].rewrites_base:
        assert set(init_report(model)["residual_error"]) == set(layers)


@pytest.mark.parametrize("method, options", [("corda", {"mode": "ipm"}),
                                             ("lora_sb", {"start_from_update": False, "update": "sgd"})])
@pytest.mark.parametrize("niter", [2, 4])
def test_randomized_data_init_reports_a_residual_close_to_the_exact_one(method, options, niter):
    """The randomized SVD (oversampling 10) of W C_d / the first update leaves within 0.1 % of the
    exact init's residual error, and the output at init is still the base model's."""
    data = calibration()
    exact = init_report(adapt(spectral_llama(), method, rank=RANK, data=data, **options))["residual_error"]
    torch.manual_seed(1)
    model = spectral_llama()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    adapt(model, method, rank=RANK, data=data, niter=niter, **options)
    fast = init_report(model)["residual_error"]
    assert set(fast) == set(exact)
    for name, error in fast.items():
        assert error == pytest.approx(exact[name], rel=1e-3), name
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [8, 200])  # a singular and a full-rank input covariance
def test_corda_top_components_without_the_inverse_equal_the_cholesky_solve(shape, tokens):
    """ipm's ``P_I = diag(S_I)^{-1} U_I^T W`` gives the components ``u_i p_i`` of the float64
    ``V^T C_d^{-1}`` to fp32 rounding (the decomposition computes in fp32), at least as closely as
    the Cholesky solve it replaces (which the inverse of a singular C's damped version amplifies)."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(*shape, generator=generator)
    rows = torch.randn(tokens, shape[1], generator=generator)
    covariance = rows.T @ rows / tokens
    damped = covariance.double() + 0.01 * torch.diagonal(covariance.double()).mean() * torch.eye(shape[1])
    u64, _, vh64 = torch.linalg.svd(weight.double() @ damped, full_matrices=False)
    exact = u64[:, :RANK, None] * (vh64[:RANK] @ torch.linalg.inv(damped))[None]
    u_all, _, p_all = corda.context_decomposition(weight, covariance, 0.01)
    u, s, p = corda.context_decomposition(weight, covariance, 0.01, rank=RANK)
    scale = exact.abs().max().item()
    fast_error = ((u[:, :, None] * p[None]).double() - exact).abs().max().item() / scale
    solve_error = ((u_all[:, :RANK, None] * p_all[None, :RANK]).double() - exact).abs().max().item() / scale
    assert fast_error < 2e-5 and fast_error <= solve_error + 1e-6
    batched = corda.context_decomposition(torch.stack([weight, 2 * weight]), torch.stack([covariance] * 2), 0.01,
                                          rank=RANK)
    torch.testing.assert_close(batched[1][0], s, atol=1e-5 * s[0].item(), rtol=0)
    torch.testing.assert_close(batched[1][1], 2 * s, atol=1e-5 * s[0].item(), rtol=0)
    torch.testing.assert_close(batched[2][1], p, atol=1e-5 * p.abs().max().item(), rtol=0)


# ----- EVA: one incremental-PCA update per group of identical inputs -------------------------


def test_eva_shares_the_update_of_layers_with_identical_inputs():
    data = calibration()
    groups = []
    original = eva._twins
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(eva, "_twins", lambda *a: groups.append(original(*a)) or groups[-1])
        shared = adapt(make_llama(), "eva", rank=RANK, data=data)
        patch.setattr(eva, "_twins", lambda blocks, pcas, history: [[name] for name in blocks])
        separate = adapt(make_llama(), "eva", rank=RANK, data=data)
    first = {tuple(sorted(name.rsplit(".", 1)[1] for name in group)) for group in groups[0]}
    assert first == {("k_proj", "q_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)}
    for (name, a), b in zip(shared.state_dict().items(), separate.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_eva_randomized_pca_finds_the_exact_components():
    """Inputs with a geometric spectrum: the randomized step (niter 2, oversampling 10) gives the
    exact step's components (|cosine| > 0.9999) and the same rank allocation."""
    generator = torch.Generator().manual_seed(7)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=generator))[0]
    batches = [(torch.randn(256, 64, generator=generator) * 0.7 ** torch.arange(64)) @ basis.T for _ in range(3)]

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 48))

    exact = adapt(model(), "eva", rank=RANK, targets=["0"], data=batches, tau=0.999)
    torch.manual_seed(1)
    calls = []
    original = svd_module.randomized_svd
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(svd_module, "randomized_svd", lambda *a, **k: calls.append(k["niter"]) or original(*a, **k))
        fast = adapt(model(), "eva", rank=RANK, targets=["0"], data=batches, tau=0.999, niter=2)
    assert calls and set(calls) == {2}  # every step of the pass was randomized
    a_exact, a_fast = exact[0].lora_A.detach(), fast[0].lora_A.detach()
    assert a_exact.shape == a_fast.shape
    assert (a_exact * a_fast).sum(dim=1).abs().min() > 0.9999


def test_batched_chunks_bound_the_stacked_numbers():
    """CorDA stacks W and C (in (out + in) numbers a layer): a chunk never holds more than BATCH_NUMBERS."""
    model = spectral_llama()
    calls = []
    original = corda.truncated_svd
    limit = 3 * 32 * (32 + 32)  # three 32 x 32 layers with their 32 x 32 covariances
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rewrite, "BATCH_NUMBERS", limit)
        patch.setattr(corda, "truncated_svd", lambda m, *a, **k: calls.append(tuple(m.shape)) or original(m, *a, **k))
        adapt(model, "corda", rank=RANK, data=calibration())
    assert calls and sum(shape[0] for shape in calls) == len(adapter_layers(model))
    for batch, out, inp in calls:
        assert batch * inp * (out + inp) <= limit or batch == 1
    assert max(shape[0] for shape in calls if shape[1:] == (32, 32)) == 3  # the 8 attention layers: 3 + 3 + 2
