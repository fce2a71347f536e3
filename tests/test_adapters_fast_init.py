"""The fast path of the SVD-based adapter inits: batched SVDs over same-shape layers and
randomized SVDs, with the residual error init_report states.

Known answers on weights with a constructed spectrum: the exact init leaves exactly the tail
``sqrt(sum_{i>r} s_i^2) / ||W||_F`` in the base, the randomized one at most that plus the
stated tolerance, and the batched init equals the layer-by-layer one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama

from rankwise import adapt, init_report
from rankwise.adapters import adapter_layers
from rankwise.adapters import rewrite

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
