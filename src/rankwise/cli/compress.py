"""``rankwise compress``: compress a trained model and say what it cost and what it bought.

It prints the parameters before / after and what the ratio means, the held-out quality
before / after (perplexity for causal LMs, hidden-state cosine fidelity for encoders) and the
CPU forward latency of the dense and the compressed model at batch 1 and 16, timed side by
side. Models: the embedded base (default) or ``--model DIR`` (any HF model directory with
safetensors weights and a tokenizer: causal LMs and encoders such as all-MiniLM-L6-v2).
Text: ``--data FILE ...`` (split into calibration and held-out parts); without it the
embedded corpus (the base's own code split, or for ``--model`` the prose split, used only to
evaluate: a data-driven method then needs ``--data``).
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

from rankwise.cli.common import add_method_arguments
from rankwise.cli.methods import method_values
from rankwise.cli.options import parse_targets
from rankwise.errors import RankwiseError


def _dense_above(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rankwise.compress.allocation import ALLOCATIONS
    from rankwise.compress.speed import BREAK_EVEN_FACTOR

    parser = sub.add_parser("compress", help="compress a trained model (low rank) and report quality, size and speed")
    parser.add_argument("--model", default=None, help="HF model directory (default: the embedded base LLaMA)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="your .txt / .jsonl files: calibration and held-out text (default: the embedded corpus)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="embedded base size (default tiny)")
    parser.add_argument("--method", default="svd", help="compression method (rankwise methods --pillar compress)")
    parser.add_argument("--ratio", type=float, required=True,
                        help="fraction of the targeted layers' weights that remains, in (0, 1)")
    parser.add_argument("--targets", default="all-linear", help="all-linear, comma-separated suffixes, or re:<regex>")
    parser.add_argument("--allocation", default=None, choices=list(ALLOCATIONS),
                        help="how ranks are shared among layers (default: the method's own)")
    parser.add_argument("--keep-dense-above", type=_dense_above, default=BREAK_EVEN_FACTOR,
                        help=f"layers kept at rank >= this x m n / (m + n) stay dense, where they are faster "
                             f"(default {BREAK_EVEN_FACTOR}, measured; 'none' factorises all)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per calibration / evaluation batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row (default 128)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="calibration batches (default 8)")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches (default 8)")
    parser.add_argument("--latency-repeats", type=int, default=10,
                        help="timed forwards per model and batch size (default 10; 0 skips the timing)")
    parser.add_argument("--out", default=None, help="directory for the compressed model (rankwise.load_compressed)")
    parser.add_argument("--base-steps", type=int, default=None, help="pretraining steps of the embedded base")
    parser.add_argument("--seed", type=int, default=0)
    add_method_arguments(parser, ("compress",), "--method", {"compress": "--method-args k=v,..."})
    parser.set_defaults(run=run)


def _load(args: argparse.Namespace):
    """``(model, tokenizer, calibration documents or None, held-out documents, text description)``."""
    from rankwise.data.corpus import load_corpus, load_text_files, split_documents
    from rankwise.data.models import load_for_inference

    if args.model:
        model, tokenizer = load_for_inference(args.model)
    else:
        from rankwise.data.models import load_base
        from rankwise.data.tokenizer import get_tokenizer

        model, tokenizer = load_base(args.preset, steps=args.base_steps), get_tokenizer()
    if args.data:
        train, held_out = split_documents(load_text_files(args.data))
        return model, tokenizer, train, held_out, f"{len(held_out)} held-out document(s) of --data"
    split = "finetune" if args.model else "pretrain"
    calibration = None if args.model else load_corpus(split, "train")
    return model, tokenizer, calibration, load_corpus(split, "validation"), f"the embedded {split} split's validation part"


def _latency_batches(batches: list[dict]) -> dict[int, dict]:
    import torch

    rows = {key: torch.cat([b[key] for b in batches]) for key in batches[0] if key != "labels"}
    sizes = {}
    for size in (1, 16):
        repeat = -(-size // rows["input_ids"].shape[0])
        sizes[size] = {key: value.repeat(repeat, 1)[:size] for key, value in rows.items()}
    return sizes


def run(args: argparse.Namespace) -> int:
    import torch

    from rankwise.compress import COMPRESSORS, compress, save_compressed
    from rankwise.compress.evaluation import (contrastive_loss, hidden_fidelity, hidden_states, is_causal_lm,
                                              parameter_count, perplexity, text_batches)
    from rankwise.compress.speed import compare_latency

    options = method_values("compress", args.method, args.method_args)
    for flag in ("batch_size", "seq_len", "calibration_batches", "eval_batches"):
        if getattr(args, flag) < 1:
            raise RankwiseError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise RankwiseError(f"--out {args.out} exists and is not a directory; choose a directory path")
    torch.manual_seed(args.seed)
    model, tokenizer, calibration_docs, held_out_docs, held_out_text = _load(args)
    compressor = COMPRESSORS.get(args.method)
    needs_data = bool(compressor.calibration) or args.allocation == "sensitivity"
    if needs_data and calibration_docs is None:
        raise RankwiseError(f"{args.method} (allocation {args.allocation or compressor.default_allocation}) is "
                            "data-driven: pass --data FILE ... with --model (its calibration text)")
    shape = {"seq_len": args.seq_len, "batch_size": args.batch_size}
    calibration = (text_batches(model, calibration_docs, tokenizer, max_batches=args.calibration_batches, **shape)
                   if needs_data else None)
    held_out = text_batches(model, held_out_docs, tokenizer, max_batches=args.eval_batches, **shape)
    causal = is_causal_lm(model)
    loss_fn: Any = None if causal or "weight_fisher" not in compressor.calibration else contrastive_loss

    original = copy.deepcopy(model)
    with torch.no_grad():
        compress(model, args.method, ratio=args.ratio, data=calibration, targets=parse_targets(args.targets),
                 allocation=args.allocation, keep_dense_above=args.keep_dense_above, loss_fn=loss_fn, **options)
    summary = model.rankwise_compression
    before, after = parameter_count(original), parameter_count(model)
    print(f"{args.method} at ratio {args.ratio} ({summary['allocation']} allocation), {type(model).__name__}:")
    print("  ratio = the fraction of the targeted layers' weights that remains (biases, embeddings, norms and "
          "untargeted layers not counted)")
    print(f"  targeted layers: {summary['dense_parameters']:,} -> {summary['kept_parameters']:,} weights "
          f"(realised ratio {summary['realised_ratio']:.4f})")
    print(f"  whole model: {before:,} -> {after:,} parameters ({after / before:.4f})")
    storage = [layer["storage"] for layer in summary["layers"].values()]
    print("  modules: " + ", ".join(f"{storage.count(s)} {s}" for s in dict.fromkeys(storage)))
    if "dense" in storage:
        print(f"  ({storage.count('dense')} kept dense: their rank is above {args.keep_dense_above} x m n / (m + n), "
              "where two thin products are slower than one dense one; --keep-dense-above none factorises them)")
    for name, reason in summary["skipped"].items():
        print(f"  skipped {name}: {reason}")
    tokens = sum(int(b["input_ids"].numel()) for b in held_out)
    if causal:
        print(f"  perplexity on {held_out_text} ({tokens:,} tokens): "
              f"{perplexity(original, held_out):.3f} -> {perplexity(model, held_out):.3f}")
    else:
        reference = hidden_states(original, held_out)
        print(f"  hidden-state cosine fidelity to the original on {held_out_text} ({tokens:,} tokens): "
              f"1.0000 -> {hidden_fidelity(model, held_out, reference):.4f}")
    if args.latency_repeats > 0:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"  CPU forward latency, median of {args.latency_repeats}, dense and compressed timed in turn "
              f"({torch.get_num_threads()} threads, load average {load:.2f}):")
        for size, batch in _latency_batches(held_out).items():
            times = compare_latency({"dense": original, "compressed": model}, batch, repeats=args.latency_repeats)
            print(f"    batch {size} x {batch['input_ids'].shape[1]}: {1000 * times['dense']:.2f} ms -> "
                  f"{1000 * times['compressed']:.2f} ms ({times['compressed'] / times['dense']:.2f}x)")
    if args.out:
        save_compressed(model, Path(args.out))
        tokenizer.save_pretrained(args.out)
        print(f"saved the compressed model and its tokenizer to {args.out} (load with rankwise.load_compressed)")
    return 0
