"""FLoRA: the Tucker update on constructed factors (Linear and Conv2d), the thin-product forward,
the whole adapter life cycle on a convolutional network (init, gradients, parameter count,
training, merge / unmerge, save / load) and the export (exact LoRA for Linear, reported error for
Conv2d kernels, exact at full rank and loading in PEFT)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_llama
from rankwise.adapters import (adapt, adapter_layers, export_peft, load_adapter, merge, save_adapter,
                               trainable_parameters, unload, unmerge)

ATOL = 1e-5


class ConvNet(nn.Module):
    def __init__(self, dilation=(1, 2)):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, (3, 2), stride=2, dilation=dilation)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


def randomise(model, seed=0, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.flora_core.copy_(scale * torch.randn(layer.flora_core.shape, generator=generator))
    return model


def test_linear_update_is_u_out_core_u_in_transposed():
    model = randomise(adapt(make_llama(), "flora", rank=3, alpha=6, targets=["down_proj"]))
    layer = next(iter(adapter_layers(model).values()))
    layer.delta_weight = None  # the forward below must not form the update
    for layer in adapter_layers(model).values():
        up, down = layer.flora_factors
        assert layer.flora_core.shape == (3, 3) and up.shape == (32, 3) and down.shape == (64, 3)
        expected = 2.0 * up @ layer.flora_core @ down.T
        x = torch.randn(2, 5, 64)
        torch.testing.assert_close(layer.adapter_forward(x), x @ expected.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(type(layer).delta_weight(layer), expected, atol=1e-6, rtol=0)


def test_conv2d_update_is_the_tucker_product_of_the_kernel_modes():
    model = randomise(adapt(ConvNet(), "flora", rank=4, targets=["conv1", "conv2"]))
    layer = adapter_layers(model)["conv2"]
    core, (u_out, u_in, u_h, u_w) = layer.flora_core, list(layer.flora_factors)
    assert core.shape == (4, 4, 3, 2)  # min(rank, mode): out 6, in 8, kernel 3 x 2
    expected = torch.einsum("abcd,oa,ib,hc,wd->oihw", core, u_out, u_in, u_h, u_w)
    torch.testing.assert_close(layer.delta_weight().reshape(6, 8, 3, 2), expected, atol=1e-6, rtol=0)
    # the two-convolution forward (stride 2, dilation (1, 2)) equals convolving with the kernel update
    x = torch.randn(2, 8, 9, 9)
    direct = torch.nn.functional.conv2d(x, expected, None, stride=2, dilation=(1, 2))
    torch.testing.assert_close(layer.adapter_forward(x), direct, atol=1e-5, rtol=0)


def test_conv2d_life_cycle(tmp_path):
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    reference = ConvNet()(x)
    model = adapt(ConvNet(), "flora", rank=4, alpha=8, targets=["conv1", "conv2"])
    torch.testing.assert_close(model(x), reference, atol=ATOL, rtol=0)
    # r^N core + sum d r_d per layer: conv1 (8, 3, 3, 3) -> ranks (4, 3, 3, 3); conv2 (6, 8, 3, 2) -> (4, 4, 3, 2)
    assert trainable_parameters(model) == (4 * 27 + 8 * 4 + 3 * 3 + 3 * 3 + 3 * 3) + (4 * 4 * 6 + 6 * 4 + 8 * 4 + 9 + 4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained = model(x)
        merge(model)
        torch.testing.assert_close(model(x), trained, atol=ATOL, rtol=0)
        for name, layer in adapter_layers(model).items():
            torch.testing.assert_close(layer.original_weight(), getattr(ConvNet(), name).weight.reshape(
                layer.out_features, -1), atol=1e-6, rtol=0)
        unmerge(model)
        torch.testing.assert_close(model(x), trained, atol=ATOL, rtol=0)
    save_adapter(model, tmp_path / "saved")
    loaded = load_adapter(ConvNet(), tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, atol=ATOL, rtol=0)
        torch.testing.assert_close(unload(loaded)(x), trained, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_fn, targets, shape", [(make_llama, ["q_proj", "down_proj"], None),
                                                       # PEFT 0.21's Conv2d LoRA drops the dilation
                                                       (lambda: ConvNet(dilation=1), ["conv1", "conv2"], (2, 3, 9, 9))],
                         ids=["linear", "conv2d"])
def test_export_is_the_exact_rank_r_lora_and_loads_in_peft(model_fn, targets, shape, tmp_path):
    peft = pytest.importorskip("peft")
    model = randomise(adapt(model_fn(), "flora", rank=2, targets=targets), scale=1.0)
    report = export_peft(model, tmp_path, require_exact=True)
    assert report["exact"] and {m["rank"] for m in report["modules"].values()} == {2}  # r_out
    loaded = peft.PeftModel.from_pretrained(model_fn(), tmp_path)
    with torch.no_grad():
        if shape is None:
            from conftest import make_batch
            batch = make_batch()
            torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=ATOL, rtol=0)
        else:
            x = torch.randn(*shape)
            torch.testing.assert_close(loaded(x), model(x), atol=ATOL, rtol=0)
