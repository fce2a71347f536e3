"""The training-time hooks: loss terms and per-step schedules reach every layer once."""

from __future__ import annotations

import torch

from rankwise.adapters import ADAPTERS, adapt, adapter_layers, after_step, regularization_loss
from rankwise.adapters.base import LINEAR_LIKE
from rankwise.adapters.lora import LoraLayer
from conftest import register_for_test


class RegularisedLora(LoraLayer):
    calls: list = []

    def regularization(self):
        return self.lora_A.square().sum()

    @classmethod
    def after_step(cls, layers, *, step, total_steps, optimizer):
        cls.calls.append((sorted(layers), step, total_steps, optimizer))


def test_plain_lora_has_no_loss_term_and_its_schedule_changes_nothing(llama, batch):
    adapt(llama, "lora", rank=2)
    assert regularization_loss(llama) is None
    with torch.no_grad():
        for layer in adapter_layers(llama).values():
            layer.lora_B.normal_()
    llama(**batch).loss.backward()  # gradients present, as after optimizer.step()
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in llama.named_parameters() if p.grad is not None}
    after_step(llama, step=1, total_steps=2, optimizer=None)
    assert all(torch.equal(v, state[k]) for k, v in llama.state_dict().items())
    assert all(torch.equal(p.grad, grads[k]) for k, p in llama.named_parameters() if p.grad is not None)


def test_loss_terms_are_summed_and_schedules_called_once_with_all_layers(llama, monkeypatch):
    register_for_test(monkeypatch, ADAPTERS, "reg-lora", RegularisedLora, supports=frozenset(LINEAR_LIKE))
    RegularisedLora.calls = []
    adapt(llama, "reg-lora", rank=2, targets=["q_proj", "v_proj"])
    layers = adapter_layers(llama)
    expected = sum(layer.lora_A.square().sum() for layer in layers.values())
    torch.testing.assert_close(regularization_loss(llama), expected)
    after_step(llama, step=3, total_steps=10, optimizer="opt")
    assert RegularisedLora.calls == [(sorted(layers), 3, 10, "opt")]
