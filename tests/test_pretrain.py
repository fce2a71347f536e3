"""Pretraining parametrisations: the registry's common suite (every row of tests/cases/pretrain_*.py
on LLaMA, GPT-2's Conv1D layers and MiniLM), the optimizer table, then lowrank's init and errors.

Method-specific checks (ReLoRA's restarts, SLTrain's memory, the Monarch projection, SST's
gradients, ...) are in tests/test_pretrain_methods.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import rankwise
from cases import collect
from conftest import make_batch, make_gpt2, make_llama
from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.layers import features, is_linear_like
from rankwise.nn import FactorizedLinear
from rankwise.pretrain import PARAMETRISATIONS, method_options, optimizer_support, parametrisation, parametrize

CASES = collect("pretrain_")
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
#: one row per method, for the tables that run every optimizer
FIRST_ROWS = list({c.method: c for c in reversed(CASES)}.values())
BASES = {"llama": make_llama, "gpt2": make_gpt2}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_shapes(model: nn.Module, case=None) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear-like layer the case's default targets select (all but the head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: features(m) for n, m in model.named_modules()
            if is_linear_like(m) and m is not head and n != "lm_head" and (case is None or case.replaces(n))}


def replaced(model: nn.Module, names) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in names}


def build(case, model: nn.Module):
    """``(model, method)``: the model parametrised by the case, and the method (its training hook)."""
    method = parametrisation(case.method, rank=case.rank, **case.options)
    return method.apply(model), method


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable tensor off its init (zero factors, a guide equal to the product, ...), so an
    identity that holds only at init cannot pass the forward test by accident."""
    gen = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.add_(scale * torch.randn(parameter.shape, generator=gen).to(parameter.dtype))
    for module in model.modules():
        if hasattr(module, "guide_ratio") and getattr(module, "guide", None) is not None:
            module.guide_ratio.fill_(0.3)


def train_steps(model, method, optimizer, steps: int, total: int | None = None, start: int = 1) -> list[float]:
    """``steps`` steps on one batch with the method's hooks and its own schedule (ReLoRA's jagged cosine)."""
    model.train()
    total = total or steps
    scheduler = method.schedule(optimizer, warmup_steps=0, total_steps=total)
    for _ in range(start - 1):
        scheduler.step()
    losses = []
    for step in range(start, start + steps):
        optimizer.zero_grad()
        loss = model(**make_batch()).loss
        loss.backward()
        optimizer.step()
        method.after_step(model, step=step, total_steps=total, optimizer=optimizer)
        scheduler.step()
        losses.append(loss.item())
    return losses


# ----- the common suite: every registered parametrisation -----------------------------------


def test_every_registered_parametrisation_has_a_row():
    missing = set(PARAMETRISATIONS.names()) - {c.method for c in CASES}
    assert not missing, f"parametrisations without a row in tests/cases/pretrain_*.py: {sorted(missing)}"


@cases
@pytest.mark.parametrize("base", BASES)
def test_trainable_parameters_follow_the_formula_and_only_replaced_layers_change(case, base):
    model = BASES[base]()
    shapes = dense_shapes(model, case)
    untouched = {n: m for n, m in model.named_modules() if n and n not in shapes and is_linear_like(m)}
    before = n_params(model)
    build(case, model)
    for name, module in untouched.items():
        assert model.get_submodule(name) is module, f"{name} is not targeted and must stay as it was"
    removed = added = 0
    for name, layer in replaced(model, shapes).items():
        assert not is_linear_like(layer), name
        out_features, in_features = shapes[name]
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad and p is not layer.bias)
        assert trainable == case.trainable_per_layer(in_features, out_features, case.rank), name
        removed += out_features * in_features  # the dense weight; the bias is carried over
        added += sum(p.numel() for p in layer.parameters() if p is not layer.bias)
    assert n_params(model) == before - removed + added


@cases
@pytest.mark.parametrize("base", BASES)
def test_forward_is_the_dense_matrix_the_layer_represents(case, base):
    model, _ = build(case, BASES[base]())
    shapes = dense_shapes(BASES[base](), case)
    perturb(model)
    gen = torch.Generator().manual_seed(0)
    for name, layer in replaced(model, shapes).items():
        weight = layer.dense_weight().detach()
        assert weight.shape == shapes[name] == (layer.out_features, layer.in_features)
        x = torch.randn(3, 5, weight.shape[1], generator=gen)
        expected = x @ weight.T + (0 if layer.bias is None else layer.bias.detach())
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@cases
def test_forward_on_the_real_minilm_encoder_is_its_dense_matrix(case, minilm):
    """BERT's Linear layers carry biases; structured_ffn takes its intermediate / output FFN layers."""
    model, _ = build(case, minilm)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "dense_weight") and not isinstance(m, nn.Linear)
              and type(m).__module__.startswith("rankwise")}
    assert layers and all(layer.bias is not None for layer in layers.values())
    if case.method == "structured_ffn":
        assert all(n.endswith(("intermediate.dense", "output.dense")) and "attention" not in n for n in layers)
    perturb(model, scale=0.01)
    gen = torch.Generator().manual_seed(1)
    for name, layer in list(layers.items())[:6]:
        x = torch.randn(2, 3, layer.in_features, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()


@cases
def test_densify_gives_a_plain_model_with_the_same_outputs(case):
    densify = getattr(rankwise, "densify", None)
    if densify is None:
        pytest.skip("rankwise.densify is written on another branch (compression); runs once it is merged")
    model, _ = build(case, make_llama())
    perturb(model)
    batch = make_batch()
    with torch.no_grad():
        expected = model(**batch).logits
        plain = densify(model)
        assert not any(isinstance(m, tuple(parametrisation(case.method, rank=case.rank, **case.options).layer_types()))
                       for m in plain.modules())
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)


@cases
def test_optimizer_state_bytes_are_two_moments_of_the_trainable_weights(case):
    """Adam keeps 2 moments per trainable weight: ``8 * formula`` bytes in fp32 (plus one 4-byte step
    counter per tensor); frozen tensors (ReLoRA's W, SST's frozen vectors, SLTrain's support) hold none."""
    model, _ = build(case, make_llama())
    shapes = dense_shapes(make_llama(), case)
    layers = replaced(model, shapes)
    parameters = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    model(**make_batch()).loss.backward()
    optimizer.step()
    formula = sum(case.trainable_per_layer(n, m, case.rank) for m, n in shapes.values())
    assert optim.state_bytes(optimizer) == 2 * 4 * formula + 4 * len(parameters)


@cases
def test_gradients_reach_every_trainable_part_and_nothing_frozen_and_the_layers_learn(case):
    torch.manual_seed(0)
    model, method = build(case, make_llama())
    layers = replaced(model, dense_shapes(make_llama(), case))
    trainable = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    # Only the replaced layers train: embeddings, norms and the head cannot do the learning.
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    losses = train_steps(model, method, optimizer, 1, total=100)  # one step: zero-initialised factors move
    optimizer.zero_grad()
    model(**make_batch(seed=9)).loss.backward()
    for name, layer in layers.items():
        for key, parameter in layer.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name}.{key}"
            else:
                assert parameter.grad is None, f"{name}.{key} is frozen but got a gradient"
    losses += train_steps(model, method, optimizer, 8, total=100, start=2)
    assert losses[-1] < losses[0] - 0.05, losses


@cases
def test_state_dict_round_trips_through_safetensors(case, tmp_path):
    model, method = build(case, make_llama())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, method, optimizer, 3, total=100)  # restarts, resamplings and guides have acted
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh, _ = build(case, make_llama(seed=1))
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


@cases
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_replaced_layers_keep_the_model_dtype_and_train(case, dtype):
    model, method = build(case, make_llama().to(dtype))
    assert {p.dtype for p in model.parameters()} == {dtype}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = train_steps(model, method, optimizer, 2, total=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for p in model.parameters()} == {dtype}


@cases
def test_bad_calls_leave_the_model_untouched(case):
    model = make_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    accepted = ", ".join(f"{k}={o.default!r}" for k, o in sorted(method_options(case.method).items()))
    with pytest.raises(RankwiseError, match=rf"unknown option\(s\) colour; it accepts: {accepted}"):
        parametrize(model, case.method, rank=case.rank, colour="red", **case.options)
    if case.rank is not None:
        with pytest.raises(RankwiseError, match="exceeds min"):
            parametrize(model, case.method, rank=33, **case.options)
        with pytest.raises(RankwiseError, match="needs a rank"):
            parametrize(model, case.method, **case.options)
    else:
        with pytest.raises(RankwiseError, match="takes no rank"):
            parametrize(model, case.method, rank=4, **case.options)
        with pytest.raises(RankwiseError, match="nblocks"):
            parametrize(model, case.method, **{**case.options, "nblocks": 5})
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in dense_shapes(make_llama()))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ----- optimizers: every rankwise.optim optimizer on every method ----------------------------


def optimizer_keywords(name: str) -> dict:
    """Small-rank, frequent-refresh settings every projected optimizer can take on rank-4 factors."""
    options = optim.method_options(name)
    wanted = {"update_proj_gap": 2} if "density" in options else {"rank": 2, "update_proj_gap": 2}  # FRUGAL: blocks
    return {k: v for k, v in wanted.items() if k in options}


@pytest.mark.parametrize("case", FIRST_ROWS, ids=[c.method for c in FIRST_ROWS])
def test_every_optimizer_that_can_take_the_parameters_trains_them_and_the_others_say_why(case):
    support = optimizer_support(case.method)
    assert set(support) == set(optim.names())
    for name in optim.names():
        torch.manual_seed(0)
        model, method = build(case, make_llama())
        if support[name]:
            with pytest.raises(RankwiseError):
                optim.build(model, name, lr=1e-3, **optimizer_keywords(name))
            continue
        optimizer = optim.build(model, name, lr=1e-2, **optimizer_keywords(name))
        layers = replaced(model, dense_shapes(make_llama(), case))
        before = {k: p.detach().clone() for layer in layers.values() for k, p in layer.named_parameters()
                  if p.requires_grad}
        losses = train_steps(model, method, optimizer, 3, total=100)
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
        after = {k: p for layer in layers.values() for k, p in layer.named_parameters() if p.requires_grad}
        moved = [k for k in before if not torch.equal(before[k], after[k].detach())]
        assert moved, f"{name} did not change any trainable tensor of {case.method}"


def test_optimizer_support_names_what_cannot_train_and_why():
    for method in PARAMETRISATIONS.names():
        support = optimizer_support(method)
        assert "lora pairs" in support["lora_pro"].lower()
        blocked = {name for name, reason in support.items() if reason}
        if method in ("monarch", "sst"):
            assert blocked == set(optim.names()) and "torch.optim.AdamW" in support["galore"]
        elif PARAMETRISATIONS.get(method).zero_factor_at_init:
            assert blocked == {"lora_pro", "gradnorm_lorp"} and "B = 0" in support["gradnorm_lorp"], (method, blocked)
        else:
            assert blocked == {"lora_pro"}, (method, blocked)


# ----- lowrank ----------------------------------------------------------------------------------


def test_lowrank_parameter_count_per_layer_with_and_without_bias(llama):
    dense = {
        n: (m.out_features, m.in_features, m.bias is not None)
        for n, m in llama.named_modules()
        if isinstance(m, nn.Linear)
    }
    before = n_params(llama)
    parametrize(llama, "lowrank", rank=4)
    removed = added = 0
    for name, (m, n, has_bias) in dense.items():
        if name == "lm_head":
            assert isinstance(llama.lm_head, nn.Linear)
            continue
        layer = llama.get_submodule(name)
        assert isinstance(layer, FactorizedLinear) and layer.rank == 4
        assert n_params(layer) == 4 * (m + n) + (m if has_bias else 0)
        removed += m * n
        added += 4 * (m + n)
    assert n_params(llama) == before - removed + added

    with_bias = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))
    bias = with_bias[0].bias.detach().clone()
    parametrize(with_bias, "lowrank", rank=2)
    assert n_params(with_bias[0]) == 2 * (10 + 6) + 6 and n_params(with_bias[2]) == 2 * (6 + 3)
    assert torch.equal(with_bias[0].bias.detach(), bias)


def test_lowrank_on_gpt2_conv1d_keeps_the_bias_and_the_tied_head(gpt2):
    conv = gpt2.transformer.h[0].attn.c_attn  # Conv1D: weight stored in x out
    bias = conv.bias.detach().clone()
    parametrize(gpt2, "lowrank", rank=4, seed=0)
    layer = gpt2.transformer.h[0].attn.c_attn
    assert isinstance(layer, FactorizedLinear) and (layer.out_features, layer.in_features) == (96, 32)
    assert torch.equal(layer.bias.detach(), bias)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # the tied head is not a target


@pytest.mark.parametrize("init_std, shape, rank", [(0.02, (256, 512), 16), (None, (384, 128), 8)])
def test_lowrank_product_matches_dense_init_variance(init_std, shape, rank):
    torch.manual_seed(0)
    out_features, in_features = shape
    model = nn.Sequential(nn.Linear(in_features, out_features))
    if init_std is not None:  # the LLaMA init N(0, 0.02^2); otherwise nn.Linear's Kaiming-uniform
        nn.init.normal_(model[0].weight, std=init_std)
    dense_var = model[0].weight.detach().pow(2).mean().item()
    parametrize(model, "lowrank", rank=rank, seed=0)
    layer = model[0]
    product_var = layer.dense_weight().detach().pow(2).mean().item()
    assert product_var == pytest.approx(dense_var, rel=0.1)
    up_norm, down_norm = layer.up.weight.detach().pow(2).sum().item(), layer.down.weight.detach().pow(2).sum().item()
    assert up_norm == pytest.approx(down_norm, rel=0.1)  # balanced factors


def test_lowrank_seed_is_reproducible_and_dtype_follows_model(llama):
    a, b = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))
    b.load_state_dict(a.state_dict())
    parametrize(a, "lowrank", rank=3, seed=7)
    parametrize(b, "lowrank", rank=3, seed=7)
    assert torch.equal(a[0].up.weight, b[0].up.weight) and torch.equal(a[0].down.weight, b[0].down.weight)

    parametrize(llama.to(torch.bfloat16), "lowrank", rank=4)
    layer = llama.model.layers[0].mlp.gate_proj
    assert layer.up.weight.dtype == torch.bfloat16 == layer.down.weight.dtype


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "option rank must be an integer >= 1, got 0"),
        (dict(rank=-3), "option rank must be an integer >= 1"),
        (dict(rank=2.5), "option rank must be an integer >= 1"),
        (dict(rank=True), "option rank must be an integer >= 1"),
        (dict(rank=33), "exceeds min"),
        (dict(rank=4, targets=["nope"]), "matched no Linear"),
        (dict(rank=4, sparsity=0.1), r"'lowrank': unknown option\(s\) sparsity; it accepts: momentum_reset_every=None, "
                                     r"refactor_every=None, seed=None"),
        (dict(rank=4, seed="x"), "option seed must be None or an integer, got 'x'"),
        (dict(rank=4, refactor_every=0), "option refactor_every must be None or an integer >= 1"),
    ],
)
def test_bad_calls_raise_and_leave_model_untouched(llama, kwargs, message):
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(RankwiseError, match=message):
        parametrize(llama, "lowrank", **kwargs)
    assert not any(isinstance(m, FactorizedLinear) for m in llama.modules())
    assert all(torch.equal(v, state[k]) for k, v in llama.state_dict().items())


def test_unknown_parametrisation_lists_known(llama):
    with pytest.raises(RankwiseError, match="unknown pretraining parametrisation 'galore'; known: .*lowrank"):
        parametrize(llama, "galore", rank=4)
    assert "lowrank" in PARAMETRISATIONS and rankwise.parametrize is parametrize


def test_already_parametrised_layers_are_not_parametrised_twice(llama):
    parametrize(llama, "lowrank", rank=4)
    with pytest.raises(RankwiseError, match="already FactorizedLinear"):
        parametrize(llama, "lowrank", rank=2)
    relora = parametrize(make_llama(), "relora", rank=4)
    with pytest.raises(RankwiseError, match="already FactorizedLinear or parametrised"):
        parametrize(relora, "sltrain", rank=2)  # ReLoRA's lora_A / lora_B are Linear but not targets


def test_a_quantized_layer_is_refused_before_anything_changes():
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(16, 16), bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))
    before = copy.deepcopy(model[0].weight.detach())
    with pytest.raises(RankwiseError, match="quantized linear8bit"):
        parametrize(model, "lowrank", rank=2)
    assert isinstance(model[0], nn.Linear) and torch.equal(model[0].weight, before)
