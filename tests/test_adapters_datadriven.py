"""Method-specific tests of the data-driven inits: corda, eva, lora_ga, lora_sb.

Formulas on constructed inputs, PEFT as an oracle (CorDA decomposition, EVA components),
LoRA-GA's first-step alignment and LoRA-SB's projected gradient as real properties, PEFT-export
factors, and bad input. The common suite (tests/test_adapters.py) runs the rows in
tests/cases/adapters_datadriven.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_batch, make_llama
from rankwise.adapters import adapt, adapter_layers
from rankwise.adapters.eva import redistribute_ranks
from rankwise.adapters.lora_ga import LoraGaLayer
from rankwise.adapters.lora_sb import LoraSbLayer
from rankwise.calibration import LayerStatistics, collect_statistics
from rankwise.errors import RankwiseError
from rankwise.linalg.incremental_pca import IncrementalPCA
from rankwise.targets import match_targets

RANK = 4
DATA_DRIVEN = ["corda", "eva", "lora_ga", "lora_sb"]


def data_batches(n: int = 2) -> list[dict]:
    return [make_batch(seed=10 + i) for i in range(n)]


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def orthogonal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def assert_equal_up_to_sign(
    actual: torch.Tensor, expected: torch.Tensor, dim: int, atol: float, rtol: float = 0.0
) -> None:
    """Equal after flipping whole rows (dim=0) or columns (dim=1) of ``actual`` to match ``expected``."""
    signs = torch.sign((actual * expected).sum(dim=1 - dim, keepdim=True))
    torch.testing.assert_close(actual * signs, expected, atol=atol, rtol=rtol)


# ----- CorDA -------------------------------------------------------------------------------


def corda_reference(weight: torch.Tensor, gram: torch.Tensor, damping: float):
    """float64 ``W C_d = U S V^T``, ``P = V^T C_d^{-1}`` by an explicit inverse."""
    weight, gram = weight.double(), gram.double()
    c = gram + damping * torch.diagonal(gram).mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(weight @ c, full_matrices=False)
    return u, s, vh @ torch.linalg.inv(c)


@pytest.mark.parametrize("mode, niter", [("ipm", None), ("kpm", None), ("ipm", 4)])
def test_corda_decomposition_on_a_constructed_layer(mode, niter):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6))
    # Inputs living mostly in a 3-dimensional subspace: C is nearly singular, damping is what makes it invertible.
    basis = orthogonal(8, 3, seed=1).float()
    batches = [torch.randn(20, 3) @ basis.T + 1e-3 * torch.randn(20, 8) for _ in range(2)]
    rows = torch.cat(batches)
    weight = net[0].weight.detach().clone()
    rank, alpha = 2, 3.0
    adapt(net, "corda", rank=rank, alpha=alpha, targets=["0"], data=batches, mode=mode, niter=niter)
    layer = net[0]
    u, s, p = corda_reference(weight, rows.T @ rows / rows.shape[0], 0.01)
    torch.testing.assert_close((u * s) @ p, weight.double(), atol=1e-6, rtol=0)  # W = (W C) C^-1
    chosen = slice(0, rank) if mode == "ipm" else slice(6 - rank, 6)
    expected_update = (u[:, chosen] * s[chosen]) @ p[chosen]
    # fp32 against fp64 through a damped inverse with condition number ~1e3: 5e-5 absolute.
    torch.testing.assert_close(layer.base_offset().double(), expected_update, atol=5e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight().double(), expected_update, atol=5e-5, rtol=0)
    torch.testing.assert_close(layer.base.weight.double(), weight.double() - expected_update, atol=5e-5, rtol=0)
    scaling = alpha / rank
    assert_equal_up_to_sign(layer.lora_B.double(), u[:, chosen] * (s[chosen] / scaling).sqrt(), dim=1, atol=5e-5)
    x = torch.randn(5, 8)
    torch.testing.assert_close(net(x), x @ weight.T + net[0].base.bias, atol=1e-5, rtol=0)


def test_corda_kpm_freezes_what_the_context_uses_and_ipm_trains_it():
    """On inputs confined to a subspace, the KPM residual keeps W's outputs on that context (it
    trains only the least-stimulated components) while the IPM adapter carries them."""
    torch.manual_seed(0)
    basis = orthogonal(16, 4, seed=2).float()
    batches = [torch.randn(64, 4) @ basis.T for _ in range(2)]
    context = torch.cat(batches)
    errors = {}
    for mode in ("ipm", "kpm"):
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(16, 12, bias=False))
        weight = net[0].weight.detach().clone()
        adapt(net, "corda", rank=4, targets=["0"], data=batches, mode=mode, damping=1e-4)
        residual = net[0].base.weight.detach()
        errors[mode] = ((context @ (weight - residual).T).norm() / (context @ weight.T).norm()).item()
    assert errors["kpm"] < 1e-2  # the trained part barely touches the context
    assert errors["ipm"] > 0.99  # the trained part is what the context uses


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft(mode, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    targets = ["q_proj", "down_proj"]
    data = data_batches()
    reference_model = make_llama()
    names = match_targets(reference_model, targets)
    stats = collect_statistics(reference_model, names, data, ["input_covariance"])
    covariance_file = tmp_path / "covariance.pt"
    torch.save({name: stats[name].input_covariance.second_moment() for name in names}, covariance_file)
    config = peft.LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=targets, init_lora_weights="corda",
        corda_config=CordaConfig(covariance_file=str(covariance_file), corda_method=mode),
    )
    preprocess_corda(reference_model, config)
    reference = peft.get_peft_model(reference_model, config)
    ours = adapt(make_llama(), "corda", rank=RANK, alpha=2 * RANK, targets=targets, data=data, mode=mode)
    for name, layer in adapter_layers(ours).items():
        theirs = reference.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.base.weight, theirs.base_layer.weight, atol=2e-5, rtol=0)
        # PEFT inverts C explicitly, rankwise solves with its Cholesky factor: fp32-level differences
        # relative to each factor's scale.
        for ours_factor, their_factor, dim in ((layer.lora_A, theirs.lora_A, 0), (layer.lora_B, theirs.lora_B, 1)):
            expected = their_factor["default"].weight.detach()
            atol = 5e-5 * expected.abs().max().item()
            assert_equal_up_to_sign(ours_factor.detach(), expected, dim=dim, atol=atol)
    batch = make_batch()
    torch.testing.assert_close(logits(ours, batch), logits(reference, batch), atol=1e-5, rtol=0)


# ----- EVA ---------------------------------------------------------------------------------


def test_incremental_pca_with_all_components_is_exact_pca():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(90, 5, generator=gen) @ torch.randn(5, 5, generator=gen) + 3.0
    pca = IncrementalPCA(5)
    for block in rows.split([30, 25, 35]):
        pca.update(block)
    centred = (rows - rows.mean(0)).double()
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    assert_equal_up_to_sign(pca.components.double(), vh, dim=0, atol=1e-4)
    torch.testing.assert_close(pca.singular_values.double(), s, atol=1e-3, rtol=1e-5)
    total = (centred**2).sum()
    torch.testing.assert_close(pca.explained_variance_ratio().double(), s**2 / total, atol=1e-5, rtol=0)
    torch.testing.assert_close(pca.mean.double(), rows.mean(0).double(), atol=1e-5, rtol=0)


def test_redistribution_known_answer():
    ratios = {
        "a": torch.tensor([0.50, 0.30, 0.10, 0.05]),
        "b": torch.tensor([0.40, 0.35, 0.20, 0.02]),
        "c": torch.tensor([0.04, 0.03, 0.02, 0.01]),
    }
    # budget 6: one each, then the three largest of the remaining ratios 0.35 (b), 0.30 (a), 0.20 (b).
    assert redistribute_ranks(ratios, 6) == {"a": 2, "b": 3, "c": 1}
    assert redistribute_ranks(ratios, 3) == {"a": 1, "b": 1, "c": 1}
    assert redistribute_ranks(ratios, 12) == {"a": 4, "b": 4, "c": 4}


def test_eva_components_on_a_constructed_layer():
    """A = the top principal directions of the layer inputs (unmasked tokens only), B = 0."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5))
    scales = torch.tensor([5.0, 3.0, 1.0, 0.1, 0.1, 0.1])
    mixing = orthogonal(6, 6, seed=4).float()
    batch = torch.randn(400, 6) * scales @ mixing.T
    adapt(net, "eva", rank=2, targets=["0"], data=[batch], rho=1.0)
    layer = net[0]
    torch.testing.assert_close(layer.lora_B, torch.zeros_like(layer.lora_B))
    _, _, vh = torch.linalg.svd((batch - batch.mean(0)).double(), full_matrices=False)
    assert_equal_up_to_sign(layer.lora_A.double(), vh[:2], dim=0, atol=1e-4)


def test_eva_drops_padding_and_masked_labels():
    model = make_llama()
    batch = make_batch(seed=3, seq=24)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][:, 18:] = 0  # padding: its activations must not count
    batch["labels"][:, :2] = -100
    name = "model.layers.0.mlp.down_proj"
    adapt(model, "eva", rank=RANK, targets=[name], data=[batch], rho=1.0)
    keep = (batch["attention_mask"].bool() & (batch["labels"] != -100)).reshape(-1)
    rows = collect_statistics(make_llama(), [name], [batch], ["input_batches"])[name].input_batches[0][keep]
    _, _, vh = torch.linalg.svd((rows - rows.mean(0)).double(), full_matrices=False)
    assert_equal_up_to_sign(model.get_submodule(name).lora_A.double(), vh[:RANK], dim=0, atol=1e-4)


def test_eva_redistributes_the_budget_and_keeps_the_scaling():
    model = adapt(make_llama(), "eva", rank=RANK, alpha=2 * RANK, data=data_batches(), rho=2.0)
    layers = adapter_layers(model)
    ranks = {name: layer.rank for name, layer in layers.items()}
    assert sum(ranks.values()) == RANK * len(layers)
    assert all(1 <= r <= 2 * RANK for r in ranks.values())
    assert len(set(ranks.values())) > 1  # the data did move ranks between layers
    for layer in layers.values():
        assert layer.scaling == pytest.approx(2.0)  # alpha / r of the request, whatever the layer's rank
        torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, torch.eye(layer.rank), atol=1e-5, rtol=0)
    unadjusted = adapt(
        make_llama(), "eva", rank=RANK, alpha=2 * RANK, data=data_batches(), adjust_scaling_factors=False
    )
    for name, layer in adapter_layers(unadjusted).items():
        assert layer.rank == ranks[name]
        assert layer.scaling == pytest.approx(2 * RANK / layer.rank)


@pytest.mark.parametrize("tau, passes", [(0.0, 2), (1.0, 4)])
def test_eva_stops_when_the_components_converge_or_the_batches_run_out(tau, passes):
    model = make_llama()
    calls = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    adapt(model, "eva", rank=RANK, data=data_batches(4), tau=tau)
    assert len(calls) == passes  # tau=0: converged at the first comparison; tau=1: every batch, once


def test_eva_redistributed_adapter_roundtrips(tmp_path, batch):
    from rankwise.adapters import load_adapter, save_adapter

    model = adapt(make_llama(), "eva", rank=RANK, data=data_batches(), rho=2.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_llama(), tmp_path)
    for name, layer in adapter_layers(loaded).items():
        assert layer.rank == model.get_submodule(name).rank
        assert layer.scaling == pytest.approx(model.get_submodule(name).scaling)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_eva_whiten_divides_by_the_root_singular_values():
    torch.manual_seed(0)
    batch = torch.randn(200, 6) * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.3, 0.1])
    plain = adapt(nn.Sequential(nn.Linear(6, 5)), "eva", rank=2, targets=["0"], data=[batch], rho=1.0)
    white = adapt(nn.Sequential(nn.Linear(6, 5)), "eva", rank=2, targets=["0"], data=[batch], rho=1.0, whiten=True)
    _, s, _ = torch.linalg.svd(batch - batch.mean(0), full_matrices=False)
    torch.testing.assert_close(white[0].lora_A, plain[0].lora_A / s[:2, None].sqrt(), atol=1e-5, rtol=1e-4)


def test_eva_matches_peft(monkeypatch):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import eva as peft_eva
    from peft.utils.incremental_pca import IncrementalPCA as PeftIncrementalPCA

    # PEFT's EVA hard-codes a randomized SVD inside its incremental PCA; run the oracle in its exact
    # mode so the comparison tests the method, not the randomized approximation.
    monkeypatch.setattr(peft_eva, "IncrementalPCA", lambda **kw: PeftIncrementalPCA(**{**kw, "lowrank": False}))

    targets = ["q_proj", "up_proj", "down_proj"]
    data = data_batches(2)
    # Both must stop after the second batch (the first comparison of consecutive estimates): rankwise
    # with tau=0 (it compares |cos|); PEFT compares the signed cosine, which a sign flip of a
    # component makes negative, so it only stops there with tau=-1 (set past EvaConfig's check).
    eva_config = peft.EvaConfig(rho=1.0, tau=0.0)
    eva_config.tau = -1.0
    config = peft.LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights="eva", eva_config=eva_config
    )
    reference = peft.get_peft_model(make_llama(), config)
    peft_eva.initialize_lora_eva_weights(reference, dataloader=data, show_progress_bar=False)
    ours = adapt(make_llama(), "eva", rank=RANK, targets=targets, data=data, rho=1.0, tau=0.0)
    for name, layer in adapter_layers(ours).items():
        theirs = reference.base_model.model.get_submodule(name).lora_A["default"].weight
        cosines = (layer.lora_A * theirs).sum(dim=1).abs()
        assert cosines.min() > 0.9999, (name, cosines)
        torch.testing.assert_close(layer.lora_B, torch.zeros_like(layer.lora_B))


# ----- LoRA-GA -----------------------------------------------------------------------------


def constructed_gradient(out_features: int, in_features: int, singular_values: list[float], seed: int):
    k = len(singular_values)
    u, v = orthogonal(out_features, k, seed).float(), orthogonal(in_features, k, seed + 1).float()
    s = torch.tensor(singular_values)
    return (u * s) @ v.T, u, s, v


@pytest.mark.parametrize("direction, niter", [(None, None), ("A2rBr", None), ("ArB2r", 4)])
def test_lora_ga_factors_on_a_constructed_gradient(direction, niter):
    """The paper's Algorithm 1 (default ArB2r): A0 = c V[:, 1:r]^T, B0 = c U[:, r+1:2r], c = d_out^(1/4)/sqrt(gamma)."""
    gradient, u, s, v = constructed_gradient(10, 12, [9.0, 7.0, 5.0, 3.0, 1.0], seed=5)
    options = {} if direction is None else {"direction": direction}
    layer = LoraGaLayer(nn.Linear(12, 10), 2, 4.0, name="probe", gamma=4.0, niter=niter, **options)
    layer.initialize(LayerStatistics(weight_gradient=gradient))
    c = 10**0.25 / 2.0
    a_cols, b_cols = (slice(2, 4), slice(0, 2)) if direction == "A2rBr" else (slice(0, 2), slice(2, 4))
    assert_equal_up_to_sign(layer.lora_B, c * u[:, b_cols], dim=1, atol=1e-5)
    assert_equal_up_to_sign(layer.lora_A, c * v[:, a_cols].T, dim=0, atol=1e-5)
    # B B^T G + G A^T A = c^2 * (top-2r part of G): the first step follows the gradient's best rank-2r part.
    first_step = layer.lora_B @ layer.lora_B.T @ gradient + gradient @ layer.lora_A.T @ layer.lora_A
    torch.testing.assert_close(first_step, c**2 * (u[:, :4] * s[:4]) @ v[:, :4].T, atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.base_offset(), 2.0 * layer.lora_B @ layer.lora_A, atol=1e-6, rtol=0)


def test_lora_ga_peft_convention_matches_peft():
    """PEFT 0.21's LoRA-GA as the oracle: from the same batches (so the same mean gradient), the same
    initial A, B (up to each singular vector's sign) and residual weight W - s B A."""
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    targets, data = ["q_proj", "up_proj", "down_proj"], data_batches()
    rank, alpha = 8, 16.0  # 4r = 32 = min(out, in) of every target: PEFT's randomized SVD is then exact
    reference_model = make_llama()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in data:
            reference_model(**batch).loss.backward()

    preprocess_loraga(reference_model, config, train_step)
    reference = peft.get_peft_model(reference_model, config)
    ours = adapt(make_llama(), "lora_ga", rank=rank, alpha=alpha, targets=targets, data=data, convention="peft")
    original = make_llama()
    for name, layer in adapter_layers(ours).items():
        theirs = reference.base_model.model.get_submodule(name)
        their_a, their_b = theirs.lora_A["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
        a_signs = torch.sign((layer.lora_A.detach() * their_a).sum(dim=1))
        b_signs = torch.sign((layer.lora_B.detach() * their_b).sum(dim=0))
        # fp32 SVDs of the same gradient by two routines: 1e-4 of each factor's largest entry
        torch.testing.assert_close(layer.lora_A.detach(), a_signs[:, None] * their_a,
                                   atol=1e-4 * their_a.abs().max().item(), rtol=0)
        torch.testing.assert_close(layer.lora_B.detach(), their_b * b_signs,
                                   atol=1e-4 * their_b.abs().max().item(), rtol=0)
        # PEFT's residual W - s B A, with B's columns and A's rows in our signs (a sign flip of one
        # singular vector changes B A, since A and B take different singular vectors)
        weight = original.get_submodule(name).weight.detach()
        torch.testing.assert_close(theirs.base_layer.weight.detach(), weight - (alpha / rank) * their_b @ their_a)
        expected = weight - (alpha / rank) * (their_b * b_signs) @ (a_signs[:, None] * their_a)
        torch.testing.assert_close(layer.base.weight.detach(), expected, atol=1e-6, rtol=0)


def full_gradients(batch: dict) -> dict[str, torch.Tensor]:
    """``dL/dW`` of every linear weight of a fresh tiny LLaMA on ``batch``."""
    fresh = make_llama()
    names = match_targets(fresh, "all-linear")
    stats = collect_statistics(fresh, names, [batch], ["weight_gradient"])
    return {name: layer_stats.weight_gradient for name, layer_stats in stats.items()}


def product(layer) -> torch.Tensor:
    """``s B A`` in float64, so the tiny first step is not lost to fp32 rounding of the product."""
    return layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()


def test_lora_ga_first_step_is_the_projected_full_gradient():
    """One SGD step on (A, B) moves the weight by -lr s^2 c^2 G_2r (+ O(lr^2)), G_2r the best rank-2r
    approximation of the full gradient: the cosine with -G is ||G_2r|| / ||G||, far above LoRA's."""
    batch, lr = make_batch(seed=21), 0.1
    gradients = full_gradients(batch)
    cosines = {}
    for method in ("lora_ga", "lora"):
        model = adapt(make_llama(), method, rank=RANK, **({"data": [batch]} if method == "lora_ga" else {}))
        torch.manual_seed(0)
        layers = adapter_layers(model)
        before = {n: product(layer) for n, layer in layers.items()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        model(**batch).loss.backward()
        optimizer.step()
        cosines[method] = []
        for name, layer in layers.items():
            step = product(layer) - before[name]
            gradient = gradients[name].double()
            cosines[method].append(torch.nn.functional.cosine_similarity(step.flatten(), -gradient.flatten(), dim=0))
            if method == "lora_ga":
                u, s, vh = torch.linalg.svd(gradient, full_matrices=False)
                best = (u[:, : 2 * RANK] * s[: 2 * RANK]) @ vh[: 2 * RANK]
                c2 = layer.out_features**0.5 / 16.0
                expected = -lr * layer.scaling**2 * c2 * best
                assert (step - expected).norm() <= 1e-2 * expected.norm(), name
                assert cosines[method][-1] == pytest.approx((best.norm() / gradient.norm()).item(), abs=1e-3)
    assert min(cosines["lora_ga"]) > 0.5
    assert sum(cosines["lora_ga"]) > 2 * sum(abs(c) for c in cosines["lora"])


# ----- LoRA-SB -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "update, step", [("adam", {"update_lr": 0.1}), ("sgd", {"update_lr": 0.1}), ("adam", {"train_lr": 0.4, "warmup_steps": 4})]
)
def test_lora_sb_factors_on_a_constructed_gradient(update, step):
    gradient, _, _, _ = constructed_gradient(10, 12, [9.0, 7.0, 5.0, 3.0, 1.0], seed=6)
    layer = LoraSbLayer(nn.Linear(12, 10), 2, 1.0, name="probe", update=update, **step)  # lr_1 = 0.1 in every row
    layer.initialize(LayerStatistics(weight_gradient=gradient))
    first_update = -0.1 * (torch.sign(gradient) if update == "adam" else gradient)
    u, s, vh = torch.linalg.svd(first_update.double(), full_matrices=False)
    assert_equal_up_to_sign(layer.lora_B.double(), u[:, :2], dim=1, atol=1e-5)
    assert_equal_up_to_sign(layer.lora_A.double(), vh[:2], dim=0, atol=1e-5)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(layer.delta_weight().double(), best, atol=1e-5, rtol=0)  # s B R0 A = trunc_r(dW_1)
    torch.testing.assert_close(layer.base_offset().double(), best, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.init_R.double(), torch.diag(s[:2] / 0.5), atol=1e-5, rtol=0)


def test_lora_sb_gradient_of_r_is_the_projected_full_gradient():
    batch = make_batch(seed=22)
    gradients = full_gradients(batch)
    # at the base point (output-preserving start), so the full gradient is the fresh model's
    model = adapt(make_llama(), "lora_sb", rank=RANK, alpha=2 * RANK, data=[batch], start_from_update=False)
    model(**batch).loss.backward()
    for name, layer in adapter_layers(model).items():
        expected = layer.scaling * layer.lora_B.T @ gradients[name] @ layer.lora_A.T
        torch.testing.assert_close(layer.lora_R.grad, expected, atol=1e-6, rtol=1e-4)


def test_lora_sb_starts_from_the_simulated_first_step_by_default():
    """The paper's start (default): base untouched, the model moved by trunc_r(-lr_1 sign(G)) with lr_1 the
    first learning rate of a linear warm-up, train_lr / warmup_steps (the authors' code)."""
    batch = make_batch(seed=23)
    gradients = full_gradients(batch)
    model = adapt(make_llama(), "lora_sb", rank=RANK, data=[batch], train_lr=5e-2, warmup_steps=5)  # lr_1 = 1e-2
    fresh = make_llama()
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.base.weight, fresh.get_submodule(name).weight, atol=0, rtol=0)
        u, s, vh = torch.linalg.svd(-1e-2 * torch.sign(gradients[name]).double(), full_matrices=False)
        expected = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        torch.testing.assert_close(layer.delta_weight().double(), expected, atol=1e-6, rtol=0)


# ----- PEFT export factors, dtype, the real encoder -----------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [("corda", {"mode": "kpm"}), ("eva", {"rho": 2.0}), ("lora_ga", {}), ("lora_sb", {}),
     ("lora_sb", {"start_from_update": False})],
)
def test_exported_adapter_reproduces_the_model_in_peft(method, options, batch, tmp_path):
    """Exported against the ORIGINAL weights (base rewrites undone), per-layer EVA ranks included."""
    peft = pytest.importorskip("peft")
    from rankwise import export_peft

    model = adapt(make_llama(), method, rank=RANK, alpha=3.0, data=data_batches(), **options)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    report = export_peft(model, tmp_path)
    assert report["exact"]
    reloaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", DATA_DRIVEN)
def test_bf16_model_keeps_its_dtype_and_output(method, batch):
    model = make_llama().to(torch.bfloat16)
    reference = logits(model, batch).float()
    # lora_sb with its output-preserving start, and a first step large enough that skipping the
    # base rewrite (the adapter's update left on top of the unchanged base) moves the logits by ~0.2
    options = {"start_from_update": False, "update": "sgd", "update_lr": 1.0} if method == "lora_sb" else {}
    adapt(model, method, rank=RANK, alpha=2 * RANK, data=data_batches(), **options)
    for layer in adapter_layers(model).values():
        assert all(t.dtype == torch.bfloat16 for t in layer.adapter_state().values())
        assert layer.base.weight.dtype == torch.bfloat16
    # Each layer's residual W - offset is rounded once to bf16; the measured differences (at most 3.4e-3,
    # lora_ga) are about one bf16 ulp of the largest logit (max |logit| ~ 0.42: 2^-7 * 0.42 = 3.3e-3), so
    # the bound is two ulps; skipping a rewrite moves the logits by 0.2-0.7.
    tolerance = 2 * torch.finfo(torch.bfloat16).eps * reference.abs().max().item()
    torch.testing.assert_close(logits(model, batch).float(), reference, atol=tolerance, rtol=0)


@pytest.mark.parametrize("method, options", [("corda", {"mode": "kpm"}), ("eva", {})])
def test_real_encoder_output_is_unchanged_at_init(minilm, method, options):
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 5000, (2, 12), generator=gen)} for _ in range(2)]
    reference = copy.deepcopy(minilm)
    adapt(minilm, method, rank=RANK, targets=["query", "value"], data=data, **options)
    probe = {"input_ids": torch.randint(1000, 5000, (2, 12), generator=gen)}
    with torch.no_grad():
        torch.testing.assert_close(
            minilm(**probe).last_hidden_state, reference(**probe).last_hidden_state, atol=1e-4, rtol=0
        )


# ----- bad input: the model is left as it was -------------------------------------------------


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


BAD = [
    (method, {"data": None}, "is data-driven: pass data=") for method in DATA_DRIVEN
] + [
    (method, {"data": [make_batch(), {"input_ids": torch.full((2, 8), 1000)}]}, "data batch 1 does not fit the model")
    for method in DATA_DRIVEN
] + [
    ("lora_ga", {"data": [{"input_ids": make_batch()["input_ids"]}]}, "gave no loss"),
    ("lora_sb", {"data": [{"input_ids": make_batch()["input_ids"]}]}, "gave no loss"),
    ("lora_ga", {"rank": 17}, "choose an integer in [1, 16]"),
    ("lora_ga", {"direction": "BA"}, "option direction must be one of 'ArB2r', 'A2rBr'"),
    ("corda", {"mode": "both"}, "corda: option mode must be one of 'ipm', 'kpm', got 'both'"),
    ("corda", {"damping": 0}, "option damping must be a number > 0"),
    ("corda", {"mode": "kpm", "niter": 2}, "needs mode='ipm'"),
    ("eva", {"rho": 0.5}, "option rho must be a number >= 1"),
    ("eva", {"tau": 2}, "option tau must be a number in [0, 1]"),
    ("eva", {"data": [make_batch(seq=1)]}, "the whole data set gives layer"),
    ("lora_sb", {"update": "lion"}, "option update must be one of 'adam', 'sgd'"),
    ("lora_sb", {"niter": -1}, "niter must be None"),
]


@pytest.mark.parametrize("method, kwargs, message", BAD, ids=[f"{m}-{msg[:24]}" for m, _, msg in BAD])
def test_bad_input_raises_and_leaves_the_model(llama, method, kwargs, message):
    kwargs = {"rank": RANK, "data": data_batches(), **kwargs}
    before = state_of(llama)
    types = {k: type(m) for k, m in llama.named_modules()}
    with pytest.raises(RankwiseError) as info:
        adapt(llama, method, **kwargs)
    assert message in str(info.value)
    assert_same_state(llama, before)
    assert {k: type(m) for k, m in llama.named_modules()} == types
    assert not adapter_layers(llama)


def test_corda_refuses_a_layer_that_saw_only_zero_inputs():
    net = nn.Sequential(nn.Linear(4, 4))
    before = state_of(net)
    with pytest.raises(RankwiseError, match="saw only zero inputs"):
        adapt(net, "corda", rank=2, targets=["0"], data=[torch.zeros(3, 4)])
    assert_same_state(net, before)


# ----- encoders: models without a loss, a pooler with one row per sequence --------------------


def encoder_batches(count: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1000, 5000, (2, 12), generator=gen)} for _ in range(count)]


@pytest.mark.parametrize("method", ["lora_ga", "lora_sb"])
def test_gradient_inits_on_an_encoder_say_to_pass_a_loss_fn(minilm, method):
    before = state_of(minilm)
    with pytest.raises(RankwiseError, match="computes none of its own.*pass loss_fn=lambda model, batch"):
        adapt(minilm, method, rank=RANK, targets=["query", "value"], data=encoder_batches(1))
    assert_same_state(minilm, before)
    assert not adapter_layers(minilm)


def test_loss_fn_gives_the_gradient_of_the_users_loss(minilm):
    """The collected G is the mean over batches of dL/dW for the user's loss (autograd on the weight as oracle)."""
    from rankwise.calibration import collect_weight_gradients

    def loss_fn(model, batch):
        return model(**batch).pooler_output.square().sum()

    batches = encoder_batches(2)
    names = ["encoder.layer.5.attention.self.query", "pooler.dense"]
    expected = {}
    for name in names:
        weight = minilm.get_submodule(name).weight
        total = torch.zeros_like(weight)
        for batch in batches:
            minilm.zero_grad()
            loss_fn(minilm, batch).backward()
            total += weight.grad / len(batches)
        expected[name] = total
    minilm.zero_grad()
    got = collect_weight_gradients(minilm, names, batches, loss_fn)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in minilm.parameters())  # nothing was written to the model


def test_loss_fn_errors_name_the_batch(minilm):
    with pytest.raises(RankwiseError, match="loss_fn must return a scalar tensor; on data batch 0"):
        adapt(minilm, "lora_ga", rank=RANK, targets=["query"], data=encoder_batches(1),
              loss_fn=lambda model, batch: model(**batch).last_hidden_state)
    with pytest.raises(RankwiseError, match="loss_fn failed on data batch 0 .*ZeroDivisionError"):
        adapt(minilm, "lora_ga", rank=RANK, targets=["query"], data=encoder_batches(1), loss_fn=lambda m, b: 1 / 0)
    with pytest.raises(RankwiseError, match="does not use data; drop the data / loss_fn"):
        adapt(minilm, "lora", rank=RANK, loss_fn=lambda m, b: 0)


def test_eva_pools_the_pooler_rows_across_batches(minilm):
    """pooler.dense sees 2 rows per batch (one per sequence); rank 4 with rho 1 needs 4 components,
    so two batches are pooled into one update -- and one batch alone is refused."""
    before = state_of(minilm)
    with pytest.raises(RankwiseError, match=r"the whole data set gives layer 'pooler.dense' only 2 .*rows, fewer "
                                            r"than the 4 components"):
        adapt(minilm, "eva", rank=4, rho=1.0, targets=["pooler.dense"], data=encoder_batches(1))
    assert_same_state(minilm, before)
    adapt(minilm, "eva", rank=4, rho=1.0, targets=["pooler.dense"], data=encoder_batches(2))
    layer = adapter_layers(minilm)["pooler.dense"]
    # the components are the top right singular vectors of the 4 pooled [CLS] rows (centred, as the PCA)
    rows = []
    handle = minilm.pooler.dense.register_forward_pre_hook(lambda m, args: rows.append(args[0].detach()))
    with torch.no_grad():
        for batch in encoder_batches(2):
            minilm(**batch)
    handle.remove()
    stacked = torch.cat(rows)
    _, _, vh = torch.linalg.svd(stacked - stacked.mean(0), full_matrices=False)
    overlap = (layer.lora_A.detach() @ vh[:4].T).abs()
    torch.testing.assert_close(overlap.max(dim=1).values, torch.ones(4), atol=1e-4, rtol=0)
