"""Data-free decomposition inits (PiSSA, OLoRA, LoLDU, SVFit, SORSA): the papers' formulas on
constructed weights, PEFT as the PiSSA / OLoRA oracle, bf16 weights, init timing, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_batch, make_llama
from rankwise.adapters import (
    adapt,
    adapter_layers,
    export_peft,
    init_report,
    load_adapter,
    regularization_loss,
    save_adapter,
    trainable_parameters,
)
from rankwise.errors import RankwiseError
from rankwise.targets import match_targets

ATOL = 1e-5
DATA_FREE = ["pissa", "olora", "loldu", "svfit", "sorsa"]


class OneLayer(nn.Module):
    """A single bias-free ``out x in`` Linear named ``proj`` holding a given weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def spectrum_weight(singular_values, out=24, n_in=40, seed=0):
    """``U diag(s) V^T`` with random orthonormal U, V: a weight whose SVD is known."""
    generator = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(singular_values, dtype=torch.float32)
    u, _ = torch.linalg.qr(torch.randn(out, len(s), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n_in, len(s), generator=generator))
    return u, s, v.T, (u * s) @ v.T


def gap_weight(rank=4):
    """Top ``rank`` singular values well separated from a small tail (randomized SVD is then exact)."""
    return spectrum_weight([10.0, 8.0, 6.0, 4.0][:rank] + [1e-3 * (20 - i) for i in range(20)])


def align_rows(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``ours`` with each row's sign flipped to match ``reference`` (SVD / QR factors are unique up to sign)."""
    signs = torch.sign((ours * reference).sum(dim=1, keepdim=True))
    return ours * signs


def layer_of(model: nn.Module):
    return next(iter(adapter_layers(model).values()))


def perturb_trainables(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.dtype))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert not adapter_layers(model)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ----- the papers' formulas on constructed weights ---------------------------------------------


@pytest.mark.parametrize("alpha", [4.0, 10.0])
def test_pissa_factors_and_residual_are_the_principal_split(alpha):
    u, s, vh, weight = spectrum_weight([9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
    model = adapt(OneLayer(weight), "pissa", rank=4, alpha=alpha)
    layer = layer_of(model)
    scaling = alpha / 4
    root = (s[:4] / scaling).sqrt()
    torch.testing.assert_close(align_rows(layer.lora_A, vh[:4]), root[:, None] * vh[:4], atol=ATOL, rtol=0)
    torch.testing.assert_close(align_rows(layer.lora_B.T, u[:, :4].T).T, u[:, :4] * root, atol=ATOL, rtol=0)
    residual = (u[:, 4:] * s[4:]) @ vh[4:]
    torch.testing.assert_close(layer.base.weight, residual, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), (u[:, :4] * s[:4]) @ vh[:4], atol=ATOL, rtol=0)
    assert trainable_parameters(model) == 4 * (24 + 40)


def test_olora_factors_are_q_and_r_of_the_weight():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    model = adapt(OneLayer(weight), "olora", rank=5, alpha=10)
    layer = layer_of(model)
    b, a = layer.lora_B, layer.lora_A
    torch.testing.assert_close(b.T @ b, torch.eye(5), atol=ATOL, rtol=0)  # orthonormal columns
    assert torch.count_nonzero(torch.tril(a, diagonal=-1)) == 0  # first rows of an upper-triangular R
    assert (torch.diagonal(a) > 0).all()  # sign-fixed
    q, r = torch.linalg.qr(weight)
    torch.testing.assert_close(b @ a, q[:, :5] @ r[:5], atol=ATOL, rtol=0)  # sign-independent product
    torch.testing.assert_close(layer.base.weight, weight - 2.0 * b @ a, atol=ATOL, rtol=0)


def test_loldu_is_the_pivoted_ldu_split():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    model = adapt(OneLayer(weight), "loldu", rank=24)  # full rank: the whole weight moves into the adapter
    layer = layer_of(model)
    torch.testing.assert_close(layer.base.weight, torch.zeros_like(weight), atol=1e-4, rtol=0)
    perm, lower, upper = torch.linalg.lu(weight)
    torch.testing.assert_close(layer.diagonal.detach(), torch.diagonal(upper), atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.U_r, upper / torch.diagonal(upper)[:, None], atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.PL_r, perm @ lower, atol=ATOL, rtol=0)
    assert layer.scaling.item() == 1.0 and layer.scaling.requires_grad

    model = adapt(OneLayer(weight), "loldu", rank=3, alpha=6)  # sigma_0 = alpha / r = 2
    layer = layer_of(model)
    assert layer.scaling.item() == 2.0
    torch.testing.assert_close(layer.diagonal.detach(), torch.diagonal(upper)[:3] / 2, atol=ATOL, rtol=0)
    unit_upper = upper / torch.diagonal(upper)[:, None]
    expected_residual = (perm @ lower)[:, 3:] @ (torch.diagonal(upper)[3:, None] * unit_upper[3:])
    torch.testing.assert_close(layer.base.weight, expected_residual, atol=1e-4, rtol=0)
    assert trainable_parameters(model) == 3 + 1
    with torch.no_grad():
        layer.scaling.fill_(3.0)
        layer.diagonal.mul_(-1.0)
    torch.testing.assert_close(
        layer.delta_weight(), 3.0 * layer.PL_r @ torch.diag(layer.diagonal) @ layer.U_r, atol=ATOL, rtol=0
    )


def test_loldu_refuses_a_zero_pivot_and_leaves_the_model():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    weight[:, 0] = 0  # the first column has no pivot
    model = OneLayer(weight)
    before = snapshot(model)
    with pytest.raises(RankwiseError, match="pivot 0 of the LU decomposition is zero.*exclude this layer"):
        adapt(model, "loldu", rank=2)
    assert_same_state(model, before)


def test_svfit_trains_only_the_top_singular_values():
    u, s, vh, weight = spectrum_weight([9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
    model = adapt(OneLayer(weight), "svfit", rank=3)
    layer = layer_of(model)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["proj.singular_values"]
    assert trainable_parameters(model) == 3
    torch.testing.assert_close(layer.singular_values.detach(), s[:3], atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.base.weight, (u[:, 3:] * s[3:]) @ vh[3:], atol=ATOL, rtol=0)
    with torch.no_grad():
        layer.singular_values.copy_(torch.tensor([1.0, -2.0, 0.5]))
    expected = (layer.U_r * torch.tensor([1.0, -2.0, 0.5])) @ layer.Vh_r
    torch.testing.assert_close(layer.delta_weight(), expected, atol=ATOL, rtol=0)
    assert torch.allclose(layer.U_r.abs(), u[:, :3].abs(), atol=ATOL)  # fixed principal subspaces


def test_sorsa_init_and_orthonormal_regulariser_on_a_constructed_case():
    u, s, vh, weight = spectrum_weight([9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
    model = adapt(OneLayer(weight), "sorsa", rank=3, gamma=0.5)
    layer = layer_of(model)
    torch.testing.assert_close(layer.S_p.detach(), s[:3], atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.base.weight, (u[:, 3:] * s[3:]) @ vh[3:], atol=ATOL, rtol=0)
    assert trainable_parameters(model) == 3 * (24 + 40) + 3
    assert float(layer.regularization()) < 1e-10  # singular vectors are orthonormal at init
    with torch.no_grad():
        layer.U_p.mul_(2.0)  # U^T U = 4 I: ||3 I||_F^2 = 9 r
        layer.Vh_p[0].zero_()  # Vh Vh^T = I minus one diagonal entry: ||.||_F^2 = 1
    torch.testing.assert_close(layer.regularization(), torch.tensor(0.5 * (9 * 3 + 1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(regularization_loss(model), torch.tensor(0.5 * (9 * 3 + 1)), atol=1e-5, rtol=0)
    layer.regularization().backward()
    assert layer.U_p.grad is not None and layer.U_p.grad.abs().sum() > 0
    assert regularization_loss(adapt(OneLayer(weight), "sorsa", rank=3, gamma=0)) is None


# ----- PEFT as the oracle -----------------------------------------------------------------------


def peft_adapted(model: nn.Module, init: str, targets: list[str], rank: int, alpha: float):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=targets)
    return peft.get_peft_model(model, config)


def assert_matches_peft(ours: nn.Module, reference: nn.Module, atol: float) -> None:
    state = reference.state_dict()
    for name, layer in adapter_layers(ours).items():
        prefix = f"base_model.model.{name}"
        torch.testing.assert_close(layer.base.weight, state[f"{prefix}.base_layer.weight"], atol=atol, rtol=0)
        peft_a, peft_b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
        torch.testing.assert_close(align_rows(layer.lora_A, peft_a), peft_a, atol=atol, rtol=0)
        torch.testing.assert_close(align_rows(layer.lora_B.T, peft_b.T).T, peft_b, atol=atol, rtol=0)


@pytest.mark.parametrize("method, init", [("pissa", "pissa"), ("olora", "olora")])
def test_same_decomposition_as_peft_on_the_llama(method, init, batch):
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = adapt(make_llama(), method, rank=4, alpha=8, targets=targets)
    reference = peft_adapted(make_llama(), init, targets, rank=4, alpha=8)
    assert_matches_peft(ours, reference, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=0)
    assert trainable_parameters(ours) == sum(p.numel() for p in reference.parameters() if p.requires_grad)


def test_randomized_pissa_matches_peft_niter_on_a_weight_with_a_spectral_gap():
    _, _, _, weight = gap_weight()
    torch.manual_seed(0)
    ours = adapt(OneLayer(weight), "pissa", rank=4, alpha=2, niter=4)
    torch.manual_seed(0)
    reference = peft_adapted(OneLayer(weight), "pissa_niter_4", ["proj"], rank=4, alpha=2)
    assert_matches_peft(ours, reference, atol=1e-4)
    exact = adapt(OneLayer(weight), "pissa", rank=4, alpha=2)
    torch.testing.assert_close(layer_of(ours).base.weight, layer_of(exact).base.weight, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", DATA_FREE)
def test_exported_adapter_reproduces_the_model_in_peft_on_the_original_weights(method, batch, tmp_path):
    PeftModel = pytest.importorskip("peft").PeftModel

    model = adapt(make_llama(), method, rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    perturb_trainables(model)
    report = export_peft(model, tmp_path, require_exact=True)
    assert report["exact"] and {m["source"] for m in report["modules"].values()} == {"factors"}
    reference = PeftModel.from_pretrained(make_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reference(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


# ----- dtypes, devices, init cost --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", DATA_FREE)
def test_half_precision_weights_are_decomposed_in_fp32_and_keep_their_dtype(method, dtype, batch):
    model = make_llama().to(dtype)
    originals = {name: copy.deepcopy(model.get_submodule(name)) for name in match_targets(model, ["q_proj", "up_proj"])}
    adapt(model, method, rank=4, targets=["q_proj", "up_proj"])
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    for name, layer in adapter_layers(model).items():
        original = originals[name]
        assert layer.base.weight.dtype == dtype
        assert all(t.dtype == dtype for t in layer.adapter_state().values())
        # The residual is formed in fp32 from the stored factors and rounded once.
        assert layer.base_offset().dtype == torch.float32
        expected_residual = (original.weight.float() - layer.base_offset()).to(dtype)
        assert torch.equal(layer.base.weight, expected_residual)
        with torch.no_grad():
            out, expected = layer(x), original(x)
        assert out.dtype == dtype
        assert (out.float() - expected.float()).abs().max() <= 0.02 * expected.float().abs().max()
    assert model(**batch).logits.dtype == dtype


def test_init_report_times_every_layer(tmp_path):
    model = adapt(make_llama(), "pissa", rank=4, niter=2)
    report = init_report(model)
    layers = adapter_layers(model)
    assert set(report["layers"]) == set(layers)
    assert all(seconds > 0 for seconds in report["layers"].values())
    assert report["total_seconds"] == pytest.approx(sum(report["layers"].values()))
    assert all(layer.init_seconds == report["layers"][name] for name, layer in layers.items())
    save_adapter(model, tmp_path)
    assert init_report(load_adapter(make_llama(), tmp_path)) == {"total_seconds": 0, "layers": {}, "residual_error": {}}
    with pytest.raises(RankwiseError, match="has no adapters"):
        init_report(make_llama())


def test_minilm_all_linear_pissa_randomized_keeps_the_output(minilm):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (2, 12), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = minilm(**inputs).last_hidden_state
    adapt(minilm, "pissa", rank=8, niter=4)
    report = init_report(minilm)
    assert len(report["layers"]) == 37 and report["total_seconds"] > 0
    with torch.no_grad():
        torch.testing.assert_close(minilm(**inputs).last_hidden_state, expected, atol=1e-4, rtol=0)


# ----- bad input: clear errors, model untouched -------------------------------------------------


@pytest.mark.parametrize("method", DATA_FREE)
def test_rank_above_the_layer_limit_is_refused(llama, method):
    before = snapshot(llama)
    with pytest.raises(RankwiseError, match=r"rank 33 is out of range.*choose an integer in \[1, 32\]"):
        adapt(llama, method, rank=33)
    assert_same_state(llama, before)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("pissa", {"niter": -1}, "niter must be None"),
        ("pissa", {"niter": 2.5}, "niter must be None"),
        ("svfit", {"niter": True}, "niter must be None"),
        ("sorsa", {"niter": "4"}, "niter must be None"),
        ("sorsa", {"gamma": -1.0}, "sorsa: option gamma must be a number >= 0, got -1.0"),
        ("sorsa", {"gamma": None}, "option gamma must be a number >= 0, got None"),
        ("loldu", {"train_scaling": "yes"}, "option train_scaling must be True or False"),
        ("olora", {"niter": 4}, "unknown option.*niter"),
        ("loldu", {"gamma": 0.1}, "unknown option.*gamma"),
        ("pissa", {"data": [make_batch()]}, "does not use data"),
    ],
)
def test_bad_options_are_refused(llama, method, options, message):
    before = snapshot(llama)
    with pytest.raises(RankwiseError, match=message):
        adapt(llama, method, rank=4, **options)
    assert_same_state(llama, before)


@pytest.mark.parametrize("method", DATA_FREE)
def test_non_finite_weight_is_refused_before_anything_changes(method):
    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(RankwiseError, match="model.layers.1.mlp.down_proj"):
        adapt(model, method, rank=4)
    assert model.state_dict().keys() == before.keys() and not adapter_layers(model)
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0, equal_nan=True)
