"""The transformers Trainer on rankwise-adapted models (AdapterCheckpoints), and every optimizer
on an adapted model's trainable parameters, refusing quantized weights."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import rankwise
from conftest import make_batch, make_llama
from rankwise import optim
from rankwise.errors import RankwiseError
from rankwise.trainer import MERGED_DIR, AdapterCheckpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def _options(name: str, rank: int) -> dict:
    return {"rank": rank} if "rank" in optim.method_options(name) and name != "frugal" else {}


def _trains_zero_weights(name: str) -> bool:
    return not getattr(optim.OPTIMIZERS.get(name), "zero_weights_stay_zero", False)


@pytest.mark.parametrize("name", optim.names())
def test_every_optimizer_builds_on_an_adapted_model_and_trains_only_the_adapter(name):
    # a weight-normalised optimizer cannot move LoRA's zero B: PiSSA's factors start non-zero
    method = "lora" if _trains_zero_weights(name) or name == "lora_pro" else "pissa"
    model = rankwise.adapt(make_llama(), method, rank=4)
    optimizer = optim.build(model, name, lr=1e-2, **_options(name, 2))
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapter = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert trained == adapter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for seed in range(2):  # B = 0 at init: A moves from the second step on
        optimizer.zero_grad()
        model(**make_batch(seed=seed)).loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".lora_" in n for n in changed)
    assert {n.rsplit(".", 1)[-1] for n in changed} == {"lora_A", "lora_B"}


def test_an_optimizer_that_cannot_move_a_zero_weight_refuses_lora_at_init():
    names = [name for name in optim.names() if not _trains_zero_weights(name)]
    assert names == ["gradnorm_lorp"]
    model = rankwise.adapt(make_llama(), "lora", rank=4)
    with pytest.raises(RankwiseError, match="an all-zero weight has no direction and never moves; 14 projected "
                                            r"weights are zero \(e.g. model.layers.0.self_attn.q_proj.lora_B"):
        optim.build(model, "gradnorm_lorp", lr=1e-2, rank=2)


def test_a_projected_optimizer_on_an_adapter_is_bounded_by_the_adapter_rank():
    model = rankwise.adapt(make_llama(), "lora", rank=4)
    with pytest.raises(RankwiseError, match=r"rank 8 exceeds min\(m, n\) = 4 of .*lora_A"):
        optim.build(model, "galore", lr=1e-3, rank=8)


def test_a_rank_at_the_width_warns_that_it_uses_more_state_than_adamw():
    model = make_llama()  # every Linear is 32 wide on its smaller side
    with pytest.warns(RuntimeWarning, match=r"rank 32 >= min\(m, n\) for 14 of the 14 projected weights .*more "
                                            r"optimizer state than AdamW"):
        optimizer = optim.build(model, "galore", lr=1e-3, rank=32)
    model.train()
    model(**make_batch()).loss.backward()
    optimizer.step()
    reference = make_llama()
    adamw = optim.build(reference, "adamw", lr=1e-3)
    reference.train()
    reference(**make_batch()).loss.backward()
    adamw.step()
    assert optim.state_bytes(optimizer) > optim.state_bytes(adamw)  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        optim.build(make_llama(), "galore", lr=1e-3, rank=8)


def _quantized_llama():
    bnb = pytest.importorskip("bitsandbytes")
    model = make_llama()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          quant_type="nf4", compute_dtype=torch.float32)
            quantized.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
            quantized = quantized.to("cpu")  # quantizes the weight (NF4 codes packed in uint8)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized)
    return model.requires_grad_(False)


def test_an_optimizer_on_a_quantized_base_is_refused_clearly():
    model = _quantized_llama()
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RankwiseError, match=r"matched 14 quantized layers \(linear4bit\) and nothing trainable.*"
                                            r"Put adapters on it \(rankwise.adapt, QLoRA\)"):
        optim.build(model, "galore", lr=1e-3, rank=4)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)
    # a quantized layer whose weight someone marked trainable (here: swapped for a float parameter)
    model.model.layers[0].self_attn.q_proj.weight = nn.Parameter(torch.zeros(4, 4), requires_grad=True)
    with pytest.raises(RankwiseError, match="are quantized layers whose weight is marked trainable"):
        optim.build(model, "adamw", lr=1e-3)


# ----- the Trainer ------------------------------------------------------------------------------


@pytest.fixture
def base_dir(tmp_path):
    """A saved base, so the adapter's PEFT config names a directory from_pretrained can read."""
    directory = tmp_path / "base"
    make_llama().save_pretrained(directory)
    return directory


def _trainer_run(base_dir, out, steps, *, optimizer="adamw", resume=None, save_merged=True):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    rankwise.adapt(model, "lora", rank=4, alpha=8)
    built = optim.build(model, optimizer, lr=1e-2, **_options(optimizer, 2))
    data = [{k: v[0] for k, v in make_batch(seed=i, batch=1).items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="constant",
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(built, None),
                      callbacks=[AdapterCheckpoints(save_merged=save_merged)])
    trainer.train(resume_from_checkpoint=resume)
    return model.eval(), trainer


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
def test_trainer_checkpoints_hold_the_adapter_the_merged_model_and_resume_exactly(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    model, trainer = _trainer_run(base_dir, tmp_path / "run", 4, optimizer="galore")
    batch = make_batch(seed=99)
    expected = _logits(model, batch)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (tmp_path / "run" / "checkpoint-2" / "rankwise_adapter.json").is_file()
    # the wrapped state dict stays for resuming, but without the base's config transformers cannot take it for the base
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "config.json").exists()
    loaded = rankwise.load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), checkpoint).eval()
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=0)
    # PEFT's files: from_pretrained(checkpoint) loads the base the adapter names plus the adapter
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    through_transformers = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    torch.testing.assert_close(_logits(through_transformers, batch), expected, rtol=0, atol=1e-6)
    in_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), checkpoint).eval()
    torch.testing.assert_close(_logits(in_peft, batch), expected, rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / MERGED_DIR).eval()
    assert not rankwise.adapters.adapter_layers(merged)
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=0, atol=1e-5)
    # save_model (the end of a run) writes the same layout
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "rankwise_adapter.json").is_file() and not (tmp_path / "final" / "config.json").exists()
    # resuming from checkpoint-2 gives the uninterrupted run's adapter
    resumed, _ = _trainer_run(base_dir, tmp_path / "run", 4, optimizer="galore",
                              resume=str(tmp_path / "run" / "checkpoint-2"), save_merged=False)
    torch.testing.assert_close(_logits(resumed, batch), expected, rtol=0, atol=0)


def test_adapter_checkpoints_need_an_adapted_model(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(RankwiseError, match="has no rankwise adapters; call rankwise.adapt"):
        Trainer(model=model, args=args, train_dataset=[], callbacks=[AdapterCheckpoints()])
