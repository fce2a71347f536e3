"""Training a rankwise-adapted model with the transformers ``Trainer``.

The Trainer saves a model with ``model.save_pretrained(dir, state_dict=...)``: for an adapted
model that writes the *wrapped* state dict (``q_proj.base.weight``, ``q_proj.lora_A``, ...) next
to the base model's ``config.json``, so ``AutoModelForCausalLM.from_pretrained(checkpoint)``
"loads fine" with every adapted layer freshly initialised. :class:`AdapterCheckpoints` fixes
that for every save the Trainer makes (checkpoints and ``trainer.save_model``)::

    trainer = Trainer(model=adapted, args=args, train_dataset=data,
                      optimizers=(rankwise.optim.build(adapted, "galore", lr=1e-3, rank=4), None),
                      callbacks=[AdapterCheckpoints(save_merged=True)])

Each save directory then holds

- the adapter, written by :func:`rankwise.save_adapter` (rankwise's files, and PEFT's
  ``adapter_config.json`` / ``adapter_model.safetensors`` when the adapter is a PEFT LoRA
  adapter): ``rankwise.load_adapter(base, dir)`` restores it, and with PEFT installed
  ``AutoModelForCausalLM.from_pretrained(dir)`` loads the base named there plus the adapter;
- the Trainer's own ``model.safetensors`` (the wrapped state dict, which
  ``trainer.train(resume_from_checkpoint=...)`` reads back into the adapted model), but no
  ``config.json``: transformers cannot mistake the wrapped weights for the base model's;
- with ``save_merged=True``, ``merged/``: the base with the update merged in
  (:func:`rankwise.unload` of a copy), its config and the tokenizer -- a plain model that
  ``from_pretrained`` loads with the adapted model's outputs.

The model keeps training unchanged: nothing is merged in place. ``adapter_root`` names the
submodule the adapters were put on (e.g. ``"bert"`` for an encoder adapted inside a
``BertForMaskedLM``), so the adapter is saved relative to the model class a user loads.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from rankwise.errors import RankwiseError

MERGED_DIR = "merged"
#: files the Trainer writes for a tokenizer, copied into ``merged/``
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja")
_HOOK_ATTR = "_rankwise_trainer_save"


def _save_merged(model: nn.Module, adapter_root: str, directory: Path, processing_class: Any = None) -> Path:
    """The base with the adapters' update merged in, written to ``directory / merged``."""
    from rankwise.adapters import unload

    target = directory / MERGED_DIR
    merged = copy.deepcopy(model)
    merged.__dict__.pop("save_pretrained", None)  # the copy's own save, not the hooked one
    root = merged.get_submodule(adapter_root) if adapter_root else merged
    unload(root)
    merged.save_pretrained(target, safe_serialization=True)
    if processing_class is not None:
        processing_class.save_pretrained(target)
    else:
        for name in _TOKENIZER_FILES:
            if (directory / name).is_file():
                shutil.copy2(directory / name, target / name)
    return target


def install_adapter_saving(model: nn.Module, *, adapter_root: str = "", save_merged: bool = False,
                           processing_class: Any = None) -> nn.Module:
    """Make ``model.save_pretrained`` write the adapter as described in the module docstring
    (what :class:`AdapterCheckpoints` does when the Trainer is built); returns ``model``."""
    from rankwise.adapters import adapter_layers, save_adapter

    root = model.get_submodule(adapter_root) if adapter_root else model
    if not adapter_layers(root):
        raise RankwiseError(
            f"{type(model).__name__} has no rankwise adapters{' under ' + adapter_root if adapter_root else ''}; call "
            "rankwise.adapt(model, ...) before building the Trainer (or drop AdapterCheckpoints)"
        )
    if getattr(model, _HOOK_ATTR, False):
        return model
    original = type(model).save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        original(model, save_directory, *args, **kwargs)
        directory = Path(save_directory)
        # The wrapped weights stay for resume_from_checkpoint; without the config transformers cannot load
        # them as the base model (with PEFT installed it loads the base the adapter names, plus the adapter).
        (directory / "config.json").unlink(missing_ok=True)
        save_adapter(root, directory)
        if save_merged:
            _save_merged(model, adapter_root, directory, processing_class)

    model.save_pretrained = save_pretrained
    setattr(model, _HOOK_ATTR, True)
    return model


class AdapterCheckpoints(TrainerCallback):
    """Every Trainer save of an adapted model writes the adapter (and, with ``save_merged``, the
    merged model) as described in the module docstring."""

    def __init__(self, *, save_merged: bool = False, adapter_root: str = "") -> None:
        self.save_merged = save_merged
        self.adapter_root = adapter_root

    def on_init_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None:
            raise RankwiseError("AdapterCheckpoints needs the Trainer's model; pass model= to the Trainer")
        install_adapter_saving(model, adapter_root=self.adapter_root, save_merged=self.save_merged,
                               processing_class=processing_class)
        return control

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        # the tokenizer is written after the model: copy it into merged/ now that both are there
        if self.save_merged and processing_class is None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for name in _TOKENIZER_FILES:
                if (checkpoint / name).is_file() and (checkpoint / MERGED_DIR).is_dir():
                    shutil.copy2(checkpoint / name, checkpoint / MERGED_DIR / name)
        return control
