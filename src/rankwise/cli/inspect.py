"""``rankwise inspect``: every diagnostic of a model (and of its fine-tune) as report.html + report.json.

Without ``--model`` it inspects the embedded cached base (and, with no ``--data``, reads the
embedded fine-tuning validation texts for the attention and representation diagnostics). A
fine-tune is given either as ``--model TUNED --base BASE`` (two model directories) or as
``--model BASE --adapter DIR`` (a rankwise or PEFT LoRA adapter; the model without it is the
base, unless ``--base`` says otherwise).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from rankwise.errors import RankwiseError

#: texts read for the attention and representation diagnostics (each truncated to 128 tokens)
MAX_TEXTS = 16


def add_parser(sub: argparse._SubParsersAction) -> None:
    from rankwise.analyze.inspection import ATTENTION_TOKENS, DEFAULT_ENTANGLEMENT_TARGETS

    parser = sub.add_parser("inspect", help="spectral, heavy-tail, entanglement and intruder diagnostics of a model "
                                            "as report.html + report.json")
    parser.add_argument("--model", help="a Hugging Face model directory (default: the embedded cached base)")
    parser.add_argument("--base", help="the model directory --model was fine-tuned from (adds the update diagnostics)")
    parser.add_argument("--adapter", help="an adapter directory (rankwise or PEFT LoRA) to apply to --model; the "
                                          "model without it is then the base")
    parser.add_argument("--data", nargs="+", help=".txt / .jsonl files for the attention entanglement and the "
                                                  "Matrix Nuclear-Norm (default with the embedded model: its texts)")
    parser.add_argument("--out", default="inspect-out", help="directory for report.html and report.json")
    parser.add_argument("--targets", default="all-linear", help="layers to report: all-linear, suffixes, re:<regex>")
    parser.add_argument("--entanglement-targets", default=",".join(DEFAULT_ENTANGLEMENT_TARGETS),
                        help="layers whose entanglement profile is drawn (default: the attention Q and V projections)")
    parser.add_argument("--attention-tokens", type=int, default=ATTENTION_TOKENS,
                        help="tokens of text the attention profiles read (rounded down to a power of two)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="embedded model size")
    parser.add_argument("--base-steps", type=int, default=None, help="pretraining steps of the cached base")
    parser.set_defaults(run=run)


def _embedded(args: argparse.Namespace) -> tuple[Any, Any, list[str], str]:
    from rankwise.data.corpus import load_corpus
    from rankwise.data.models import base_dir, load_base
    from rankwise.data.tokenizer import get_tokenizer

    model = load_base(args.preset, steps=args.base_steps)
    texts = [] if args.data else load_corpus("finetune", "validation")
    return model, get_tokenizer(), texts, f"embedded {args.preset} base ({base_dir(args.preset, steps=args.base_steps)})"


def run(args: argparse.Namespace) -> int:
    from rankwise.analyze.inspection import inspect_model
    from rankwise.analyze.inspection_page import render
    from rankwise.cli.options import parse_targets
    from rankwise.data.corpus import load_text_files
    from rankwise.data.models import load_for_inference, merge_adapter_directory

    if args.attention_tokens < 4:
        raise RankwiseError(f"--attention-tokens must be >= 4, got {args.attention_tokens}")
    if args.model:
        model, tokenizer = load_for_inference(args.model, tokenizer_required=False)
        texts, source = [], args.model
    else:
        model, tokenizer, texts, source = _embedded(args)
    if args.data:
        texts = load_text_files(args.data)
    base = None
    if args.adapter:
        base = copy.deepcopy(model)
        model = merge_adapter_directory(model, args.adapter)
    if args.base:
        base, _ = load_for_inference(args.base, tokenizer_required=False)
    report = inspect_model(
        model, base=base, texts=texts[:MAX_TEXTS], tokenizer=tokenizer, targets=parse_targets(args.targets),
        entanglement_targets=parse_targets(args.entanglement_targets), attention_tokens=args.attention_tokens,
    )
    meta = [("model", source), ("architecture", type(model).__name__)]
    meta += [(k, v) for k, v in (("base", args.base), ("adapter", args.adapter)) if v]
    if not args.base and args.adapter:
        meta.append(("base", f"{source} without the adapter"))
    meta.append(("texts", f"{', '.join(args.data)}" if args.data else ("embedded fine-tuning validation texts"
                                                                        if texts else "none")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["meta"] = dict(meta)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    render(report, meta).write(out / "report.html")
    print(f"inspected {len(report['layers'])} layers of {source}: wrote {out / 'report.html'} and "
          f"{out / 'report.json'}")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0
