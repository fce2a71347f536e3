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
* :func:`load_model_dir` -- a local model directory (safetensors weights only): a Hugging Face
  model (causal LM, encoder with or without its masked-LM head), or what a rankwise command
  wrote (a model, a factorised model, an adapter over its base), with the objective it is
  trained on; :func:`load_user_model` returns its ``(model, tokenizer)``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rankwise.cache import cache_dir
from rankwise.data._cache import atomic_directory
from rankwise.errors import RankwiseError
from rankwise.files import read_json_object

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


#: what a rankwise command writes beside its output (base, objective, set-up), so that the
#: directory can be read back as ``--model`` (see :func:`load_model_dir`)
RUN_FILE = "rankwise_run.json"
RUN_FORMAT = "rankwise-run"
#: the objectives a model directory is trained on (``rankwise.training``: CAUSAL_LM, MASKED_LM,
#: hidden_state_fidelity)
OBJECTIVES = ("causal-lm", "masked-lm", "hidden-states")
_ADAPTER_FILES = ("rankwise_adapter.json", "adapter_config.json")


@dataclass
class LoadedModel:
    """A model read from a directory, what it is trained on, and where adapters go.

    ``objective`` is one of :data:`OBJECTIVES`. ``adapter_root`` names the submodule adapters
    are put on and saved relative to ("" = the whole model): the encoder inside a
    ``*ForMaskedLM`` (its ``base_model_prefix``, e.g. ``bert``), so an encoder's adapter loads
    onto ``AutoModel.from_pretrained(dir)``, the class a user of the encoder loads. ``how`` says
    in one line what was loaded.
    """

    model: nn.Module
    tokenizer: Any
    objective: str
    adapter_root: str = ""
    how: str = ""

    @property
    def adapter_module(self) -> nn.Module:
        return self.model.get_submodule(self.adapter_root) if self.adapter_root else self.model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loading warnings off (we probe classes whose heads may be missing on purpose)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _objective_of(config: Any) -> str | None:
    """The objective the config's architecture names, None when it names no head (probe then)."""
    for architecture in config.architectures or ():
        if architecture.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if architecture.endswith(("ForMaskedLM", "ForPreTraining")):
            return "masked-lm"
    return None


def _is_encoder(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)


def _from_pretrained(auto_class: Any, directory: Path) -> tuple[nn.Module, list[str]]:
    with _quiet_transformers():
        model, info = auto_class.from_pretrained(directory, local_files_only=True, use_safetensors=True,
                                                 output_loading_info=True)
    return model, list(info.get("missing_keys", []))


def _load_hf_model(directory: Path) -> tuple[nn.Module, str, str, str]:
    """``(model, objective, adapter_root, how)`` of a Hugging Face model directory.

    A causal LM (``*ForCausalLM`` / ``*LMHeadModel``, or a decoder-only config): next-token
    prediction. An encoder whose checkpoint has its masked-LM head (``*ForMaskedLM``, or
    loadable as ``AutoModelForMaskedLM`` with no weight missing): masked-LM. Any other encoder
    (a sentence-embedding model such as all-MiniLM-L6-v2 has no head): ``AutoModel`` with the
    hidden-state fidelity objective.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    objective = _objective_of(config)
    if objective is None and not _is_encoder(config):
        objective = "causal-lm"
    if objective == "causal-lm":
        model, missing = _from_pretrained(AutoModelForCausalLM, directory)
        if missing:
            raise RankwiseError(
                f"{directory} loads as {type(model).__name__} but the checkpoint lacks {missing[:3]} (a head?); "
                "rankwise would train freshly initialised weights -- save the model with its language-model head"
            )
        return model, objective, "", f"{type(model).__name__} from {directory} (causal LM: next-token loss)"
    if objective is None:  # an encoder saved without naming a head: does it hold the masked-LM head?
        model, missing = _from_pretrained(AutoModelForMaskedLM, directory)
        objective = "masked-lm" if not missing else "hidden-states"
        if objective == "hidden-states":
            del model
    if objective == "masked-lm":
        model, missing = _from_pretrained(AutoModelForMaskedLM, directory)
        if missing:
            raise RankwiseError(f"{directory} names a masked-LM head but the checkpoint lacks {missing[:3]}; "
                                "save the model with its head")
        root = model.base_model_prefix if hasattr(model, model.base_model_prefix or "") else ""
        return model, objective, root, (f"{type(model).__name__} from {directory} (encoder with its masked-LM head: "
                                        "masked-token loss)")
    model, _ = _from_pretrained(AutoModel, directory)
    return model, "hidden-states", "", (
        f"{type(model).__name__} from {directory} (encoder without a language-model head: hidden-state fidelity "
        "to the starting model on masked input)")


def _check_hf_directory(directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise RankwiseError(
            f"{directory} has no config.json; pass a directory written by save_pretrained (config + weights + "
            "tokenizer) or by a rankwise command's --out"
        )
    if not any(directory.glob("*.safetensors")):
        raise RankwiseError(
            f"{directory} has no .safetensors weights; rankwise does not load pickled checkpoints. Convert with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_FILES)


def _load_tokenizer(directory: Path, required: bool = True) -> Any:
    if not _has_tokenizer(directory) and not required:
        return None
    if not _has_tokenizer(directory):
        raise RankwiseError(
            f"{directory} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save the model's tokenizer there "
            "with tokenizer.save_pretrained(dir)"
        )
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise RankwiseError(f"cannot load a tokenizer from {directory} ({error}); save one there with "
                            "tokenizer.save_pretrained(dir)") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_run_info(directory: str | Path) -> dict[str, Any] | None:
    """The :data:`RUN_FILE` a rankwise command wrote in ``directory``, or None."""
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RankwiseError(f"{path} is not valid JSON ({exc}); delete it or re-run the command that wrote it") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise RankwiseError(f"{path} is not a {RUN_FORMAT} file; delete it or re-run the command that wrote it")
    return info


def load_base_reference(reference: dict[str, Any]) -> LoadedModel:
    """The base a run started from, as :data:`RUN_FILE` records it: ``{"embedded": preset,
    "base_steps": n}`` (the cached embedded base, rebuilt if the cache was cleared) or
    ``{"path": dir}`` (a model directory, read with :func:`load_model_dir`)."""
    if "embedded" in reference:
        from rankwise.data.tokenizer import get_tokenizer

        model = load_base(reference["embedded"], steps=reference.get("base_steps"))
        return LoadedModel(model, get_tokenizer(), "causal-lm", "",
                           f"the embedded {reference['embedded']} base")
    if "path" in reference:
        return load_model_dir(reference["path"])
    raise RankwiseError(f"unknown base reference {reference!r}; expected 'embedded' or 'path'")


def _load_adapter_directory(directory: Path, run: dict[str, Any] | None) -> LoadedModel:
    """An adapter directory (rankwise's or PEFT's) merged into the base it was trained on."""
    if run is not None and isinstance(run.get("base"), dict):
        reference = run["base"]
    else:
        peft_config = read_json_object(directory, "adapter_config.json", what="adapter directory",
                                       fix="pass a directory written by save_adapter or by PEFT")
        base_path = peft_config.get("base_model_name_or_path")
        if not base_path or not Path(base_path).is_dir():
            raise RankwiseError(
                f"{directory} is an adapter directory whose base ({base_path!r}) is not a local directory; "
                "load the base and the adapter yourself (rankwise.load_adapter / import_peft), or pass the base "
                "as --model"
            )
        reference = {"path": base_path}
    base = load_base_reference(reference)
    merge_adapter_directory(base.adapter_module, directory)
    tokenizer = _load_tokenizer(directory) if _has_tokenizer(directory) else base.tokenizer
    return LoadedModel(base.model, tokenizer, base.objective, base.adapter_root,
                       f"the adapter in {directory} merged into {base.how}")


def merge_adapter_directory(module: nn.Module, directory: str | Path) -> nn.Module:
    """Merge the adapter in ``directory`` into ``module`` (in place; returned): rankwise's format
    (also the layout of rankwise < 0.2, under PEFT's file names) through ``load_adapter``, any
    other through ``import_peft`` (which says what it cannot read)."""
    from rankwise import adapters

    path = Path(directory)
    if (path / "rankwise_adapter.json").is_file() or _is_rankwise_config(path / "adapter_config.json"):
        adapters.load_adapter(module, path)
    else:
        adapters.import_peft(module, path)
    return adapters.unload(module)


def _is_rankwise_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == "rankwise-adapter"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def load_model_dir(path: str | Path, *, tokenizer_required: bool = True) -> LoadedModel:
    """A model from a local directory (no download), whatever wrote it:

    - a Hugging Face model directory (config, safetensors weights, tokenizer): the class and
      objective follow the model type (see :func:`_load_hf_model`);
    - a directory written by ``rankwise compress`` / ``pretrain --parametrize`` (factorised
      layers, ``rankwise_compressed.json``): :func:`rankwise.load_compressed`;
    - an adapter directory (``rankwise finetune --method ... --out``, ``save_adapter``, or a
      PEFT adapter whose base is a local directory): the base it names, with the adapter
      merged in.

    Weights are read from safetensors only (never pickles). The tokenizer gets its eos token
    as pad token when it has none, so batches can be padded; a directory without one raises,
    unless ``tokenizer_required=False`` (then ``tokenizer`` is None).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise RankwiseError(f"model directory {directory} does not exist; pass a local Hugging Face model directory")
    run = read_run_info(directory)
    if not (directory / "config.json").is_file() and any((directory / n).is_file() for n in _ADAPTER_FILES):
        return _load_adapter_directory(directory, run)
    from rankwise.compress.io import MANIFEST_FILE as COMPRESSED_MANIFEST

    if (directory / COMPRESSED_MANIFEST).is_file():
        from rankwise.compress import load_compressed

        model = load_compressed(directory)
        tokenizer = _load_tokenizer(directory, tokenizer_required)
        return LoadedModel(model, tokenizer, "causal-lm", "", f"the factorised {type(model).__name__} in {directory}")
    _check_hf_directory(directory)
    tokenizer = _load_tokenizer(directory, tokenizer_required)
    model, objective, root, how = _load_hf_model(directory)
    return LoadedModel(model, tokenizer, objective, root, how)


def load_for_inference(path: str | Path, *, tokenizer_required: bool = True) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of :func:`load_model_dir` for reading or compressing a model: a
    causal LM as it is, an encoder as its bare encoder (the ``*ForMaskedLM`` head dropped, as a
    user of the encoder loads it with ``AutoModel``), in eval mode."""
    loaded = load_model_dir(path, tokenizer_required=tokenizer_required)
    model = loaded.model if loaded.objective == "causal-lm" else loaded.adapter_module
    return model.eval(), loaded.tokenizer


def load_user_model(path: str | Path) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of :func:`load_model_dir`."""
    loaded = load_model_dir(path)
    return loaded.model, loaded.tokenizer
