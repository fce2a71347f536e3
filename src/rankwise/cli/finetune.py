"""``rankwise finetune``: fine-tune a model with an adapter (``--method``) or an optimizer (``--optim``).

With ``--method`` the adapter's parameters are trained by ``--optim`` (AdamW by default, any
``rankwise.optim`` optimizer, LoRA+ with ``--loraplus-lr-ratio``); without it, the model's
weights are (full fine-tuning); with ``--welore-lrc-only`` the base is compressed by WeLore
and only its low-rank components train. The result goes to ``--out`` (else a fresh directory under
``rankwise-runs/``), a valid ``--model`` for the next command.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from rankwise.bench.runner import Checkpointing
from rankwise.bench.setup import SetUp
from rankwise.cli.common import (
    add_device_arguments,
    add_method_arguments,
    add_model_arguments,
    add_optim_arguments,
    add_parser as new_parser,
    add_training_arguments,
    check_model_arguments,
    check_out_path,
    make_workload,
    method_optimizer,
    optim_setup,
    positive_float,
    refuse,
    run_config,
    train_and_report,
)
from rankwise.cli.methods import method_values
from rankwise.cli.options import parse_targets
from rankwise.cli.outputs import output_dir, write_adapter, write_model

ADAPTER_LR = 3e-3
FULL_LR = 3e-4


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = new_parser(sub, "finetune", "fine-tune a model with an adapter (--method) or an optimizer (--optim)",
                        __doc__)
    add_model_arguments(parser, base=True)
    add_training_arguments(parser, steps=200, lr_help=f"default: {ADAPTER_LR:g} with --method, {FULL_LR:g} without")
    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--method", default=None,
                         help="adapter method (`rankwise methods --pillar adapters`); default: none, full fine-tuning")
    adapter.add_argument("--alpha", type=positive_float, default=None,
                         help="adapter scaling numerator (LoRA: scale = alpha / rank; default: alpha = rank)")
    adapter.add_argument("--targets", default="all-linear",
                         help="layers to adapt: all-linear (every Linear-like layer but the output head), "
                              "comma-separated suffixes, or re:<regex>")
    adapter.add_argument("--loraplus-lr-ratio", type=positive_float, default=None, metavar="RATIO",
                         help="LoRA+: the B factors train at RATIO x --lr (the paper uses 16; default: off)")
    adapter.add_argument("--export-peft", default=None, metavar="DIR",
                         help="also write the adapter in PEFT's LoRA format to DIR (exact for factored updates, "
                              "else the best rank-r approximation, with its error printed; default: none)")
    adapter.add_argument("--welore-lrc-only", type=positive_float, nargs="?", const=0.5, default=None, metavar="RATIO",
                         help="WeLore: compress the base to RATIO of its weights (0.5 without a value) and fine-tune "
                              "only its low-rank components (rankwise.compress.trainable_lrc); default: off")
    add_optim_arguments(parser, default="adamw", with_method="--method")
    add_device_arguments(parser)
    add_method_arguments(parser, ("adapters", "optim"), "--method, else --optim",
                         {"adapters": "--method-args k=v,...",
                          "optim": "--optim-args k=v,...; also --method-args when there is no --method"})
    parser.set_defaults(run=run)


def _adapter_setup(args: argparse.Namespace) -> SetUp:
    options = {**method_values("adapters", args.method, args.method_args), "targets": parse_targets(args.targets)}
    if args.alpha is not None:
        options["alpha"] = args.alpha
    optimizer, optimizer_options = method_optimizer(args, "--method")
    lr = ADAPTER_LR if args.lr is None else args.lr
    return SetUp(args.method, "adapter", args.method, lr=lr, rank=8 if args.rank is None else args.rank,
                 options=options, optimizer=optimizer, optimizer_options=optimizer_options)


def _welore_setup(args: argparse.Namespace) -> SetUp:
    refuse(bool(args.method or args.optim != "adamw" or args.optim_args),
           "--welore-lrc-only fine-tunes the compressed base's low-rank components with AdamW (WeLore's recipe); "
           "drop --method / --optim / --optim-args")
    lr = FULL_LR if args.lr is None else args.lr
    return SetUp(f"welore {args.welore_lrc_only:g} LRC only", "compress_lrc", "welore", lr=lr,
                 ratio=args.welore_lrc_only)


def _setup(args: argparse.Namespace) -> SetUp:
    if args.welore_lrc_only is not None:
        return _welore_setup(args)
    if args.method:
        return _adapter_setup(args)
    return optim_setup(args, f"full fine-tuning {args.optim}", FULL_LR, method_args=True)


def run(args: argparse.Namespace) -> int:
    check_model_arguments(args)
    if not args.method:
        for flag, given in (("--alpha", args.alpha is not None), ("--targets", args.targets != "all-linear"),
                            ("--export-peft", args.export_peft is not None)):
            refuse(given, f"{flag} applies to an adapter; give --method (e.g. lora), or for the layers an optimizer "
                          "projects use --optim-target-modules")
    if args.export_peft:
        check_out_path(Path(args.export_peft))
    config = run_config(args)
    setup = _setup(args)
    out = output_dir(args.out, "finetune", setup.name)
    workload = make_workload(args, "finetune", config, from_base=True)
    write = partial(write_adapter if setup.kind == "adapter" else write_model, workload=workload, setup=setup, command="finetune")
    checkpointing = Checkpointing(args.save_steps, out, lambda model, path: write(model, path)) \
        if args.save_steps else None
    row, model = train_and_report(setup, workload, config, args, checkpointing)
    written = write(model, out, row=row)
    where = "given by --out" if args.out else "choose the place with --out"
    print(f"saved the {'adapter' if written == 'adapter' else 'fine-tuned model'} to {out} ({where}); "
          f"it is a valid --model for the next command")
    if args.export_peft:
        from rankwise.adapters import export_peft

        root = model.get_submodule(workload.adapter_root) if workload.adapter_root else model
        report = export_peft(root, args.export_peft)
        quality = "exactly" if report["exact"] else f"approximately (largest relative error {report['max_relative_error']:.3g})"
        print(f"wrote the adapter in PEFT's LoRA format to {args.export_peft} ({quality}); "
              "load it with peft.PeftModel.from_pretrained(base, dir)")
    return 0
