"""``rankwise compress``: factorise a trained model's Linear layers."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rankwise.bench.runner import RunConfig
from rankwise.cli.common import add_method_arguments, make_workload
from rankwise.cli.methods import method_values
from rankwise.cli.options import parse_targets


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("compress", help="factorise a trained model's Linear layers")
    parser.add_argument("--model", default=None, help="HF model directory (default: the embedded base)")
    parser.add_argument("--data", nargs="+", default=None, help="calibration / evaluation text (with --model)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--method", default="svd")
    parser.add_argument("--ratio", type=float, required=True, help="fraction of the targeted parameters kept, in (0, 1)")
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--base-steps", type=int, default=None, help="pretraining steps of the cached base")
    parser.add_argument("--seed", type=int, default=0)
    add_method_arguments(parser, ("compress",), "--method", {"compress": "--method-args k=v,..."})
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rankwise.compress import compress, save_compressed
    from rankwise.training import evaluate

    options = method_values("compress", args.method, args.method_args)
    config = RunConfig(batch_size=args.batch_size, seq_len=args.seq_len, eval_batches=8, seed=args.seed)
    # The base was pretrained on the code split: compression is judged on its held-out part.
    workload = make_workload(args, "pretrain", config, from_base=True)
    model = workload.make_model()
    batches = workload.batches(config)
    calibration = [next(batches) for _ in range(4)]
    params_before = sum(p.numel() for p in model.parameters())
    loss_before = evaluate(model, workload.eval_data)
    with torch.no_grad():
        compress(model, args.method, ratio=args.ratio, data=calibration, targets=parse_targets(args.targets), **options)
    params_after = sum(p.numel() for p in model.parameters())
    loss_after = evaluate(model, workload.eval_data)
    print(f"{args.method} at ratio {args.ratio}: parameters {params_before:,} -> {params_after:,} "
          f"({params_after / params_before:.3f} of the whole model)")
    print(f"validation loss {loss_before:.4f} -> {loss_after:.4f}; "
          f"perplexity {math.exp(loss_before):.2f} -> {math.exp(loss_after):.2f}")
    if args.out:
        save_compressed(model, Path(args.out))
        print(f"saved the compressed model to {args.out}")
    return 0
