"""LoRA vs full fine-tuning of Q and V on the embedded base, through the artificial-entanglement lens.

    python tools/diagnostics_reproduction.py --out docs/figures          # the figures of docs/diagnostics.md

Starting from the cached tiny base (``rankwise.data.models.load_base("tiny")``), it fine-tunes
the attention query and value projections on the embedded fine-tuning split four ways -- LoRA
rank 4 and rank 16 (alpha = 2 r, lr 3e-3), LoRA rank 16 at lr 3e-4, and full fine-tuning of
the same two weights (everything else frozen, lr 3e-4) -- with the rankwise training loop
(AdamW, cosine schedule, gradient clipping at 1, the same batches for all), then measures,
per Q / V layer:

* the internal entanglement profile of the update ``dW = W1 - W0`` (rankwise.analyze
  defaults: prime-factor sites, rows then columns), its fitted law and central valley depth;
* the intruder dimensions of ``W1`` against ``W0`` (top 10, epsilon 0.5);
* the principal-angle overlap of each LoRA update's column space with the full update's;

and, on the first 128 validation tokens, the external (attention) profile of every head of
the base and of every tuned model. It writes ``diagnostics_internal.png``,
``diagnostics_external.png``, ``diagnostics_intruders.png`` and ``diagnostics_results.json``
into ``--out`` and prints the tables of docs/diagnostics.md. ``--replot`` redraws the
figures and tables from an existing ``diagnostics_results.json`` without training.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import rankwise
from rankwise.analyze import (
    attention_matrices,
    entanglement_profile,
    fit_entanglement_law,
    intruder_dimensions,
    subspace_overlap,
)
from rankwise.data.batches import embedded_data
from rankwise.data.corpus import load_corpus
from rankwise.data.models import load_base
from rankwise.data.tokenizer import get_tokenizer
from rankwise.training import cosine_schedule, evaluate, train

TARGETS = ("q_proj", "v_proj")


def finetune(base, batches, validation, method: str, rank: int | None, steps: int, lr: float):
    model = copy.deepcopy(base)
    if method == "lora":
        rankwise.adapt(model, "lora", rank=rank, alpha=2 * rank, targets=list(TARGETS))
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(tuple(f"{t}.weight" for t in TARGETS)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    started = time.perf_counter()
    result = train(model, optimizer, copy.deepcopy(batches), steps=steps, eval_batches=validation,
                   scheduler=cosine_schedule(optimizer, warmup_steps=steps // 10, total_steps=steps),
                   max_grad_norm=1.0)
    if method == "lora":
        model = rankwise.unload(model)
    return model, {"val_loss": result.final_val_loss, "trainable": sum(p.numel() for p in trainable),
                   "seconds": time.perf_counter() - started}


def layer_names(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name.endswith(TARGETS)]


def external_profiles(model, ids) -> list[dict]:
    out = []
    for layer, heads in enumerate(attention_matrices(model, ids)):
        profiles = [entanglement_profile(head) for head in heads]
        mean = [sum(p.entropies[c] for p in profiles) / len(profiles) for c in range(len(profiles[0].entropies))]
        law = fit_entanglement_law(mean, ceiling=list(profiles[0].ceiling))
        head_laws = [fit_entanglement_law(p).law for p in profiles]
        out.append({"layer": layer, "mean": mean, "ceiling": list(profiles[0].ceiling), "law": law.law,
                    "r2": law.best.r2, "head_laws": {k: head_laws.count(k) for k in sorted(set(head_laws))}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--replot", action="store_true", help="redraw from --out/diagnostics_results.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        summary = json.loads((out / "diagnostics_results.json").read_text())
        names = list(next(iter(summary["internal"].values())))
        plot(summary["internal"], summary["external"], names, out)
        print_tables(summary, names)
        return

    base = load_base("tiny")
    tokenizer = get_tokenizer()
    batches, validation = embedded_data("finetune", batch_size=args.batch_size, seq_len=args.seq_len, seed=0,
                                        eval_batches=4, tokenizer=tokenizer)
    runs = {"LoRA r=4": ("lora", 4, 3e-3), "LoRA r=16": ("lora", 16, 3e-3),
            "LoRA r=16, lr 3e-4": ("lora", 16, 3e-4), "full FT (Q, V)": ("full", None, 3e-4)}
    tuned, summary = {}, {"base_val_loss": evaluate(base, validation), "steps": args.steps, "runs": {}}
    for label, (method, rank, lr) in runs.items():
        tuned[label], summary["runs"][label] = finetune(base, batches, validation, method, rank, args.steps, lr)
        print(f"{label}: {summary['runs'][label]}", flush=True)

    names = layer_names(base)
    internal: dict[str, dict[str, dict]] = {label: {} for label in tuned}
    for label, model in tuned.items():
        for name in names:
            w0 = base.get_submodule(name).weight.detach()
            w1 = model.get_submodule(name).weight.detach()
            profile = entanglement_profile(w1 - w0)
            law = fit_entanglement_law(profile)
            internal[label][name] = {
                "entropies": list(profile.entropies), "ceiling": list(profile.ceiling), "law": law.law,
                "r2": law.best.r2, "valley": profile.valley, "centre": profile.entropies[profile.num_sites // 2 - 1],
                "intruders": intruder_dimensions(w0, w1).count,
                "relative_update": float((w1 - w0).norm() / w0.norm()),
            }
    full = tuned["full FT (Q, V)"]
    for label in (label for label in tuned if label.startswith("LoRA")):
        for name in names:
            w0 = base.get_submodule(name).weight.detach()
            lora_update = tuned[label].get_submodule(name).weight.detach() - w0
            full_update = full.get_submodule(name).weight.detach() - w0
            internal[label][name]["overlap_with_full"] = subspace_overlap(lora_update, full_update).overlap
    ids = tokenizer("\n\n".join(load_corpus("finetune", "validation")), add_special_tokens=False, truncation=True,
                    max_length=128, return_tensors="pt")["input_ids"][0]
    external = {label: external_profiles(model, ids) for label, model in {"base": base, **tuned}.items()}
    summary.update({"internal": internal, "external": external})
    (out / "diagnostics_results.json").write_text(json.dumps(summary, indent=1))
    plot(internal, external, names, out)
    print_tables(summary, names)


def plot(internal, external, names, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"LoRA r=4": "#c0392b", "LoRA r=16": "#e67e22", "LoRA r=16, lr 3e-4": "#b7950b",
               "full FT (Q, V)": "#2471a3", "base": "#555"}
    short = {"LoRA r=4": "r4", "LoRA r=16": "r16", "LoRA r=16, lr 3e-4": "r16 slow", "full FT (Q, V)": "FT"}
    fig, axes = plt.subplots(2, len(names) // 2, figsize=(3.4 * len(names) // 2, 6.6), squeeze=False)
    for ax, name in zip(axes.T.flat, names):
        first = next(iter(internal.values()))[name]
        cuts = range(1, len(first["entropies"]) + 1)
        ax.plot(cuts, first["ceiling"], color="#bbb", ls="--", lw=1, label="ceiling ln min(D_left, D_right)")
        for label, layers in internal.items():
            ax.plot(cuts, layers[name]["entropies"], "o-", ms=2.5, lw=1.2, color=colours[label], label=label)
        ax.axvline((len(first["entropies"]) + 1) // 2, color="#ddd", lw=0.8)
        valleys = ", ".join(f"{short[label]} {layers[name]['valley']:.2f}" for label, layers in internal.items())
        ax.set_title(name.replace("model.layers.", "layer ").replace(".self_attn.", " ") + f"\nvalley: {valleys}",
                     fontsize=8.5)
        ax.set_xlabel("cut l (middle: out | in)", fontsize=8)
        ax.set_ylabel("S_l (nats)", fontsize=8)
        ax.set_ylim(0, 5.2)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8.5, frameon=False)
    fig.suptitle("internal entanglement of the update dW of Q and V (14 sites: 7 row legs then 7 column legs)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / "diagnostics_internal.png", dpi=110)
    plt.close(fig)

    layers = len(next(iter(external.values())))
    fig, axes = plt.subplots(1, layers, figsize=(3.4 * layers, 3.6), squeeze=False)
    for ax, index in zip(axes[0], range(layers)):
        first = external["base"][index]
        cuts = range(1, len(first["mean"]) + 1)
        ax.plot(cuts, first["ceiling"], color="#bbb", ls="--", lw=1, label="ceiling ln min(D_left, D_right)")
        for label, entries in external.items():
            ax.plot(cuts, entries[index]["mean"], "o-", ms=2.5, lw=1.2, color=colours[label], label=label)
        laws = ", ".join(sorted({entries[index]["law"] for entries in external.values()}))
        ax.set_title(f"layer {index}: mean over heads\nfitted law: {laws}", fontsize=8.5)
        ax.set_xlabel("cut l", fontsize=8)
        ax.set_ylabel("S_l (nats)", fontsize=8)
        ax.set_ylim(0, 5.2)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8.5, frameon=False)
    fig.suptitle("external entanglement: attention matrices on 128 validation tokens (14 sites)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "diagnostics_external.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(internal)
    highest = 0
    for k, (label, layers_) in enumerate(internal.items()):
        counts = [layers_[n]["intruders"] for n in names]
        highest = max(highest, *counts)
        positions = [i + k * width for i in range(len(names))]
        ax.bar(positions, counts, width, color=colours[label], label=label)
        for x, count in zip(positions, counts):
            ax.text(x, count + 0.05, str(count), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width for i in range(len(names))])
    ax.set_xticklabels([n.replace("model.layers.", "layer ").replace(".self_attn.", " ") for n in names], fontsize=8)
    ax.set_yticks(range(highest + 2))
    ax.set_ylim(0, highest + 1.6)
    ax.set_ylabel("intruder dimensions (top 10)")
    ax.set_title("intruder dimensions of the tuned Q and V weights (epsilon 0.5)")
    ax.legend(fontsize=8, ncol=len(internal), loc="upper center")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "diagnostics_intruders.png", dpi=110)
    plt.close(fig)


def print_tables(summary, names) -> None:
    print(f"\nbase val loss {summary['base_val_loss']:.4f}")
    print("| run | trainable | val loss | seconds |\n|---|---|---|---|")
    for label, run in summary["runs"].items():
        print(f"| {label} | {run['trainable']:,} | {run['val_loss']:.4f} | {run['seconds']:.0f} |")
    print("\n| layer | " + " | ".join(f"{label}: law / valley / S(out\\|in) / intruders / rel. update"
                                    for label in summary["internal"])
          + " |\n|---|" + "---|" * len(summary["internal"]))
    for name in names:
        cells = []
        for label, layers in summary["internal"].items():
            e = layers[name]
            cells.append(f"{e['law']} / {e['valley']:.2f} / {e['centre']:.2f} / {e['intruders']} / "
                         f"{e['relative_update']:.2f}")
        print(f"| {name.replace('model.layers.', '')} | " + " | ".join(cells) + " |")
    loras = [label for label in summary["internal"] if label.startswith("LoRA")]
    print("\n| layer | " + " | ".join(f"overlap with full FT: {label}" for label in loras) + " |\n|---|"
          + "---|" * len(loras))
    for name in names:
        print(f"| {name.replace('model.layers.', '')} | "
              + " | ".join(f"{summary['internal'][label][name]['overlap_with_full']:.3f}" for label in loras) + " |")
    print("\n| layer | " + " | ".join(summary["external"]) + " |\n|---|" + "---|" * len(summary["external"]))
    for index in range(len(summary["external"]["base"])):
        cells = [f"{e[index]['law']} (R2 {e[index]['r2']:.2f}; heads {e[index]['head_laws']})"
                 for e in summary["external"].values()]
        print(f"| {index} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
