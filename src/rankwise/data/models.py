"""LLaMA presets, the cached pretrained base, and the user's own Hugging Face models.

* :data:`PRESETS` -- ``tiny`` (~1.9M parameters) and ``small`` (~13.7M) ``LlamaForCausalLM``
  configurations for the embedded 4096-token vocabulary, untied input/output embeddings.
* :func:`load_base` -- the base checkpoint fine-tuning starts from: pretrained *by rankwise*
  with :func:`rankwise.training.train` (AdamW, cosine schedule, gradient clipping at 1) on the
  ``pretrain`` split, built on first use and cached as safetensors + JSON under
  ``cache_dir()/base-<preset>-<steps>-<tokenizer key>/`` (written to a temporary directory and
  renamed, so an interrupted build leaves nothing behind). The directory is a complete HF model
  directory (config, weights, tokenizer) plus ``rankwise_base.json`` with the recipe and its
  validation loss.
* :func:`load_user_model` -- a local HF model directory (safetensors weights only).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rankwise.cache import cache_dir
from rankwise.data._cache import atomic_directory
from rankwise.errors import RankwiseError

_COMMON = {
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "initializer_range": 0.02,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 384, **_COMMON},
    "small": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 6,
              "intermediate_size": 1024, **_COMMON},
}

# Pretraining recipe of the cached base, per preset (steps chosen so the tiny base builds in
# about a minute on 2 CPU cores).
BASE_STEPS = {"tiny": 400, "small": 400}
BASE_BATCH_SIZE = 16
BASE_SEQ_LEN = 128
BASE_LR = {"tiny": 3e-3, "small": 1.5e-3}
BASE_WEIGHT_DECAY = 0.1
BASE_SEED = 0
BASE_EVAL_BATCHES = 16
BASE_INFO_FILE = "rankwise_base.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _preset(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise RankwiseError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


def model_config(preset: str = "tiny", *, vocab_size: int | None = None) -> LlamaConfig:
    """The ``LlamaConfig`` of ``preset``; ``vocab_size`` defaults to the embedded tokenizer's."""
    from rankwise.data.tokenizer import VOCAB_SIZE

    settings = _preset(preset)
    vocab_size = VOCAB_SIZE if vocab_size is None else vocab_size
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise RankwiseError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    # The embedded tokenizer's only special token, <|endoftext|>, has id 0 and plays every role.
    return LlamaConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0, **settings)


def build_model(preset: str = "tiny", *, vocab_size: int | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised LLaMA of ``preset``; the same ``seed`` gives the same weights.

    The global RNG is forked, so building a model does not disturb the caller's random stream.
    """
    config = model_config(preset, vocab_size=vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); only ``requires_grad`` ones if asked."""
    unique = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in unique.values())


def base_dir(preset: str = "tiny", *, steps: int | None = None, seq_len: int = BASE_SEQ_LEN,
             batch_size: int = BASE_BATCH_SIZE) -> Path:
    """Cache directory of the base :func:`load_base` would return for these arguments."""
    from rankwise.data.tokenizer import tokenizer_key

    _preset(preset)
    steps = BASE_STEPS[preset] if steps is None else steps
    shape = "" if (batch_size, seq_len) == (BASE_BATCH_SIZE, BASE_SEQ_LEN) else f"-b{batch_size}x{seq_len}"
    return cache_dir() / f"base-{preset}-{steps}{shape}-{tokenizer_key()}"


def _pretrain_base(preset: str, steps: int, seq_len: int, batch_size: int, progress: bool):
    from rankwise.data.batches import embedded_data
    from rankwise.data.tokenizer import get_tokenizer
    from rankwise.training import cosine_schedule, train

    tokenizer = get_tokenizer()
    batches, validation = embedded_data(
        "pretrain", batch_size=batch_size, seq_len=seq_len, seed=BASE_SEED, eval_batches=BASE_EVAL_BATCHES,
        tokenizer=tokenizer,
    )
    model = build_model(preset, vocab_size=len(tokenizer), seed=BASE_SEED)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=BASE_LR[preset], betas=(0.9, 0.95), weight_decay=BASE_WEIGHT_DECAY
    )
    scheduler = cosine_schedule(optimizer, warmup_steps=max(1, steps // 20), total_steps=steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"pretraining the {preset} base (once, then cached)", unit="step")
    started = time.perf_counter()
    try:
        result = train(model, optimizer, batches, steps=steps, eval_batches=validation, scheduler=scheduler,
                       progress=bar, max_grad_norm=1.0)
    finally:
        if bar is not None:
            bar.close()
    info = {
        "preset": preset, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": BASE_LR[preset],
        "weight_decay": BASE_WEIGHT_DECAY, "seed": BASE_SEED, "optimizer": "AdamW(betas=(0.9, 0.95))",
        "schedule": "cosine, 5% warm-up, min ratio 0.1", "max_grad_norm": 1.0,
        "final_val_loss": result.final_val_loss, "final_val_ppl": result.final_val_ppl,
        "ms_per_step": result.ms_per_step, "build_seconds": time.perf_counter() - started,
    }
    return model, tokenizer, info


def load_base(
    preset: str = "tiny",
    *,
    steps: int | None = None,
    seq_len: int = BASE_SEQ_LEN,
    batch_size: int = BASE_BATCH_SIZE,
    progress: bool = True,
) -> LlamaForCausalLM:
    """The pretrained base of ``preset`` for fine-tuning: loaded from the cache, built on first use.

    ``steps`` defaults to :data:`BASE_STEPS` of the preset. The recipe and the base's
    validation loss are in ``rankwise_base.json`` of :func:`base_dir`.
    """
    _preset(preset)
    steps = BASE_STEPS[preset] if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise RankwiseError(f"steps must be a positive integer, got {steps!r}")
    if seq_len > PRESETS[preset]["max_position_embeddings"]:
        raise RankwiseError(f"seq_len {seq_len} exceeds the preset's {PRESETS[preset]['max_position_embeddings']} positions")
    directory = base_dir(preset, steps=steps, seq_len=seq_len, batch_size=batch_size)
    if not (directory / BASE_INFO_FILE).is_file():
        model, tokenizer, info = _pretrain_base(preset, steps, seq_len, batch_size, progress)
        with atomic_directory(directory) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            # Written last: its presence marks a complete entry.
            (staging / BASE_INFO_FILE).write_text(json.dumps(info, indent=2))
    return LlamaForCausalLM.from_pretrained(directory, local_files_only=True, use_safetensors=True)


def base_info(preset: str = "tiny", **kwargs: Any) -> dict[str, Any] | None:
    """The recipe and validation loss of a cached base (None if it is not built yet)."""
    path = base_dir(preset, **kwargs) / BASE_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_user_model(path: str | Path) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local Hugging Face model directory (no download).

    Weights are read from safetensors only (never pickles). The tokenizer gets its eos token as
    pad token when it has none, so batches can be padded.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise RankwiseError(f"model directory {directory} does not exist; pass a local Hugging Face model directory")
    if not (directory / "config.json").is_file():
        raise RankwiseError(
            f"{directory} has no config.json; pass a directory written by save_pretrained (config + weights + tokenizer)"
        )
    if not any(directory.glob("*.safetensors")):
        raise RankwiseError(
            f"{directory} has no .safetensors weights; rankwise does not load pickled checkpoints. Convert with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise RankwiseError(
            f"{directory} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the model's tokenizer there "
            "with tokenizer.save_pretrained(dir)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise RankwiseError(f"cannot load a tokenizer from {directory} ({error}); save one there with "
                            "tokenizer.save_pretrained(dir)") from None
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, use_safetensors=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
