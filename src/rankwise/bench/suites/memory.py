"""The ``memory`` suite: weights + optimizer state as the model grows, beside the papers' columns.

Its ``run`` hook builds the published LLaMA pretraining configs (60M, 130M, 350M, 1B, 7B:
GaLore's ``configs/llama_*.json``, arXiv 2403.03507) on the meta device -- nothing is
allocated -- in bf16 (the papers' "pure bf16" setting), builds every registered optimizer
over it (projected group = the attention and MLP Linear weights, rank as in the papers' table:
128 / 256 / 256 / 512, and 1024 at 7B), takes one step on meta gradients so every state
tensor exists, and counts it with :func:`rankwise.optim.state_bytes` (the accounting the
optimizers report, projectors included). LoRA fine-tuning adds the adapters (rank as above,
every Linear but the head) to the frozen bf16 base and counts AdamW on them; QLoRA is the same
with the base in NF4 (``0.5`` byte per weight of the targeted layers plus a float32 absmax
per 64 -- bitsandbytes' layout without double quantisation, computed, since bitsandbytes
cannot build on the meta device). It writes ``memory.json`` and ``memory.png`` (bytes vs
parameters, the published points beside) and prints the table.

Why the figures may differ from the papers': the GaLore paper's memory column is an estimate
of "weights + optimizer state" in bf16 with a 32000-token vocabulary; rankwise counts exactly
what its optimizers allocate (e.g. the unprojected embedding / head / norms keep full AdamW
moments, projectors are stored in the weight's dtype, integer step counters are Python ints).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from rankwise.bench.setup import SetUp

WORKLOAD = ("pretrain", False)
SETUPS: list[SetUp] = []

GIB = 1024**3
#: GaLore's LLaMA configs (hidden, intermediate, heads, layers), vocabulary 32000, and the table's rank
CONFIGS: dict[str, dict[str, int]] = {
    "60M": {"hidden": 512, "intermediate": 1376, "heads": 8, "layers": 8, "rank": 128},
    "130M": {"hidden": 768, "intermediate": 2048, "heads": 12, "layers": 12, "rank": 256},
    "350M": {"hidden": 1024, "intermediate": 2736, "heads": 16, "layers": 24, "rank": 256},
    "1B": {"hidden": 2048, "intermediate": 5461, "heads": 32, "layers": 24, "rank": 512},
    "7B": {"hidden": 4096, "intermediate": 11008, "heads": 32, "layers": 32, "rank": 1024},
}
VOCAB = 32000
#: the papers' memory columns (weights + optimizer state, GB): GaLore arXiv 2403.03507 Table 2,
#: APOLLO arXiv 2412.05270 Table 2
PUBLISHED_GB: dict[str, dict[str, float]] = {
    "adamw": {"60M": 0.36, "130M": 0.76, "350M": 2.06, "1B": 7.80},
    "galore": {"60M": 0.24, "130M": 0.52, "350M": 1.22, "1B": 4.38},
    "apollo_mini": {"60M": 0.12, "130M": 0.25, "350M": 0.69, "1B": 2.60},
}
NF4_BYTES_PER_WEIGHT = 0.5 + 4 / 64  # 4-bit codes + one float32 absmax per block of 64


def llama_on_meta(config: dict[str, int], *, vocab: int = VOCAB):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(hidden_size=config["hidden"], intermediate_size=config["intermediate"],
                     num_attention_heads=config["heads"], num_key_value_heads=config["heads"],
                     num_hidden_layers=config["layers"], vocab_size=vocab, tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(hf).to(torch.bfloat16)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_options(name: str, rank: int) -> dict[str, Any]:
    """The keys each optimizer gets: the table's rank where it has one (FRUGAL: its density; DCT its rank)."""
    from rankwise.optim import method_options

    declared = method_options(name)
    options: dict[str, Any] = {}
    if "rank" in declared and name != "frugal":
        options["rank"] = 1 if name == "apollo_mini" else rank
    if "refresh" in declared:
        options["refresh"] = "randomized"  # the state is the same in every mode; the meta step is shape-only
    return options


def measure(configs: dict[str, dict[str, int]] = CONFIGS, *, vocab: int = VOCAB) -> list[dict[str, Any]]:
    """One row per (config, optimizer or fine-tuning set-up): parameters, weight and state bytes."""
    import torch

    from rankwise import adapt, optim

    rows = []
    names = [n for n in optim.names() if n != "lora_pro"]  # lora_pro trains adapters: the LoRA rows
    for label, config in configs.items():
        for name in ["torch_adamw", *names]:
            model = llama_on_meta(config, vocab=vocab)
            params = list(model.parameters())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "torch_adamw":
                    opt = torch.optim.AdamW(params, lr=1e-3)
                else:
                    opt = optim.build(model, name, lr=1e-3, **optimizer_options(name, config["rank"]))
            for p in params:
                p.grad = torch.empty_like(p)
            opt.step()
            rows.append(_row(label, name, params, _tensor_bytes(params), optim.state_bytes(opt)))
        for name, nf4 in (("lora", False), ("qlora", True)):
            model = llama_on_meta(config, vocab=vocab)
            adapt(model, "lora", rank=config["rank"])
            trainable = [p for p in model.parameters() if p.requires_grad]
            frozen = [p for p in model.parameters() if not p.requires_grad]
            weights = _tensor_bytes(model.parameters())
            if nf4:  # the targeted Linear weights (2-D frozen weights but embeddings / head) in NF4
                from rankwise.adapters.base import AdapterLayer

                quantized = [m.base.weight for m in model.modules() if isinstance(m, AdapterLayer)]
                weights += int(sum(w.numel() for w in quantized) * NF4_BYTES_PER_WEIGHT) - _tensor_bytes(quantized)
            opt = optim.build(model, "adamw", lr=1e-3)
            for p in trainable:
                p.grad = torch.empty_like(p)
            opt.step()
            rows.append(_row(label, name, trainable + frozen, weights, optim.state_bytes(opt)))
    return rows


def _row(label: str, name: str, params, weights: int, state: int) -> dict[str, Any]:
    total = weights + state
    published = PUBLISHED_GB.get(name, {}).get(label)
    return {"config": label, "setup": name, "parameters": sum(p.numel() for p in params),
            "weight_bytes": weights, "state_bytes": state, "total_bytes": total,
            "total_gib": total / GIB, "published_gb": published,
            "vs_published": None if published is None else total / 1e9 / published}


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for index, setup in enumerate(dict.fromkeys(r["setup"] for r in rows)):
        points = [(r["parameters"], r["total_bytes"] / 1e9) for r in rows if r["setup"] == setup]
        line, = ax.plot(*zip(*points), marker="o", markersize=3, label=setup, linestyle="-" if index < 10 else "--")
        published = [(r["parameters"], r["published_gb"]) for r in rows if r["setup"] == setup and r["published_gb"]]
        if published:
            ax.scatter(*zip(*published), marker="x", s=60, color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("weights + optimizer state (GB, bf16)")
    ax.set_title("memory vs model size (lines: rankwise, exact; x: published)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_rows(rows: list[dict[str, Any]]) -> str:
    labels = list(dict.fromkeys(r["config"] for r in rows))
    lines = [f"{'setup':14s}" + "".join(f"{label:>18s}" for label in labels)]
    for setup in dict.fromkeys(r["setup"] for r in rows):
        cells = []
        for label in labels:
            row = next(r for r in rows if r["setup"] == setup and r["config"] == label)
            published = f" ({row['published_gb']:.2f})" if row["published_gb"] else ""
            cells.append(f"{row['total_bytes'] / 1e9:.2f}G{published}")
        lines.append(f"{setup:14s}" + "".join(f"{c:>18s}" for c in cells))
    return "\n".join(lines)


def run(context) -> list[Path]:
    """Measure every config and optimizer (module docstring); returns the files written."""
    rows = measure()
    print("\n== memory: weights + optimizer state, bf16, GB = 1e9 bytes (published in brackets) ==")
    print(format_rows(rows))
    context.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = context.out / "memory.json", context.out / "memory.png"
    json_path.write_text(json.dumps({"configs": CONFIGS, "vocab": VOCAB, "published_gb": PUBLISHED_GB,
                                     "rows": rows}, indent=2))
    _plot(rows, png_path)
    return [json_path, png_path]
