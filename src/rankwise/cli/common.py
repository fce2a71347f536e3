"""What several ``rankwise`` commands share: argument groups (with their defaults in ``--help``),
checked argument types, the run configuration, the workload (embedded default or the user's
model and files), the optimizer of ``--optim`` and its flags, and the training run itself.

Every flag either takes effect or is refused with a RankwiseError saying why: flags of another
mode (``--alpha`` without ``--method``, ``--base-steps`` with ``--model``, ...) are refused
here, options an optimizer or method does not declare by its own checks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rankwise.bench.runner import CHECKPOINTING, DTYPES, Checkpointing, RunConfig, Workload, run_setup
from rankwise.bench.setup import SetUp
from rankwise.cli.methods import method_values
from rankwise.cli.options import optim_options
from rankwise.errors import RankwiseError

#: what ``--preset`` means when it is not given
DEFAULT_PRESET = "tiny"


# ---- argument types: a bad value is an argparse error naming the flag -------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number (> 0), got {text}")
    return value


def sequence_length(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be at least 2 (a window predicts its tokens after the first)")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help with every option's default appended when its help does not state one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        if "default" not in text and not unset and action.option_strings and action.nargs != 0:
            text += " (default: %(default)s)"
        return text


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, description: str = "") -> argparse.ArgumentParser:
    """A sub-command parser with :class:`HelpFormatter`; ``description`` may use reST double backquotes."""
    text = (description or help[0].upper() + help[1:] + ".").replace("``", "")
    return sub.add_parser(name, help=help, description=text, formatter_class=HelpFormatter)


# ---- argument groups ---------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, *, base: bool) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", metavar="DIR",
                       help="a model directory: a Hugging Face model (causal LM, or an encoder: masked-LM loss with "
                            "its MLM head, else hidden-state fidelity) or what a rankwise command wrote with --out "
                            "(default: the embedded model)")
    group.add_argument("--data", nargs="+", metavar="FILE",
                       help=".txt / .jsonl files or directories of them (JSONL: the 'text' field); one .txt file is "
                            "split into training and validation parts by paragraphs or by size (default: the "
                            "embedded corpus)")
    group.add_argument("--preset", default=None, choices=["tiny", "small"],
                       help=f"size of the embedded model (default: {DEFAULT_PRESET}; not with --model)")
    if base:
        group.add_argument("--base-steps", type=positive_int, default=None, metavar="N",
                           help="pretraining steps of the cached embedded base the run starts from "
                                "(default: the preset's, 400; not with --model)")


def add_training_arguments(parser: argparse.ArgumentParser, *, steps: int, lr_help: str) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=positive_int, default=steps, metavar="N", help="optimisation steps")
    group.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="sequences per step")
    group.add_argument("--seq-len", type=sequence_length, default=128, metavar="T", help="tokens per sequence")
    group.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate ({lr_help}); "
                       "linear warm-up over 10%% of the steps (at most 10), then cosine decay to a tenth")
    group.add_argument("--seed", type=int, default=0, help="seed of the batches and of random inits")
    group.add_argument("--eval-steps", type=positive_int, default=None, metavar="N",
                       help="evaluate every N steps (default: steps / 6; always before the first and after the "
                            "last step)")
    group.add_argument("--save-steps", type=positive_int, default=None, metavar="N",
                       help="also save a checkpoint every N steps to OUT/checkpoint-<step> (the output so far plus "
                            "the training state; default: no checkpoints)")
    group.add_argument("--resume-from-checkpoint", "--resume", dest="resume", default=None, metavar="DIR",
                       help="continue the run saved in a checkpoint-<step> directory: give the saved run's other "
                            "arguments again; the result is the uninterrupted run's (default: start afresh)")
    group.add_argument("--out", default=None, metavar="DIR",
                       help="directory for the result, a valid --model for the next command (default: "
                            "rankwise-runs/<command>-<set-up>-<time>, printed at the end)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device, precision and memory")
    group.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    group.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                       help="dtype the model's weights are cast to before training (bf16: no fp32 master copy)")
    group.add_argument("--bf16", action="store_true",
                       help="bf16 mixed precision: forward and loss under torch.autocast(bfloat16), weights, "
                            "gradients and optimizer state kept in --dtype (fp32 master weights by default)")
    group.add_argument("--gradient-checkpointing", nargs="?", const="non-reentrant", default=None,
                       choices=list(CHECKPOINTING),
                       help="recompute each block's activations in backward instead of storing them "
                            "(transformers' activation checkpointing); alone: non-reentrant (default: off)")
    add_progress_argument(parser)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    if "--no-progress" not in parser._option_string_actions:
        parser.add_argument("--no-progress", action="store_true",
                            help="no progress bars (rankwise's, and transformers' loading / saving bars)")


def add_optim_arguments(parser: argparse.ArgumentParser, default: str, *, with_method: str) -> None:
    group = parser.add_argument_group(
        "optimizer", f"With {with_method} the optimizer trains the method's parameters (an adapter's factors); "
                     "without it, the model's weights.")
    group.add_argument("--optim", default=default, metavar="NAME",
                       help="optimizer: one of rankwise.optim.names() (`rankwise methods --pillar optim`)")
    group.add_argument("--rank", type=positive_int, default=None,
                       help=f"rank of {with_method}'s layers, else of the optimizer's projection "
                            "(default: the method's or the optimizer's own)")
    group.add_argument("--update-proj-gap", type=positive_int, default=None, metavar="N",
                       help="steps between subspace refreshes of a projected optimizer (default: the optimizer's)")
    group.add_argument("--scale", type=positive_float, default=None,
                       help="scale of a projected optimizer's update (default: the optimizer's)")
    group.add_argument("--proj-type", default=None,
                       help="projection side of a projected optimizer: std, reverse_std, left, right, full "
                            "(default: the optimizer's)")
    group.add_argument("--optim-target-modules", default="all-linear", metavar="TARGETS",
                       help=f"layers whose weights the optimizer projects: all-linear, comma-separated suffixes, or "
                            f"re:<regex> (not with {with_method}, whose layers are chosen by the method)")
    group.add_argument("--optim-args", default=None, metavar="K=V,...",
                       help='more optimizer hyperparameters, Trainer-style: "rank=8,update_proj_gap=50" '
                            "(default: none)")
    group.add_argument("--layerwise", action="store_true",
                       help="step each parameter inside backward from its gradient hook (rankwise.optim.layerwise)")
    group.add_argument("--accumulation-steps", type=positive_int, default=None, metavar="N",
                       help="with --layerwise: step every N micro-batches (--steps counts micro-batches); the step "
                            "uses the mean of their gradients (default: 1)")


def add_method_arguments(parser: argparse.ArgumentParser, pillars: tuple[str, ...], method_flags: str,
                         args_flag: dict[str, str]) -> None:
    from rankwise.cli.methods import HelpMethod

    parser.add_argument("--help-method", metavar="NAME", action=HelpMethod, pillars=pillars, args_flag=args_flag,
                        help=f"list the options of method NAME ({' or '.join(pillars)}) with defaults, then exit")
    parser.add_argument("--method-args", default=None, metavar="K=V,...",
                        help=f"options of the method ({method_flags}), checked against its declarations; "
                             "see --help-method (default: none)")


# ---- checks and configuration ------------------------------------------------------------------


def refuse(condition: bool, message: str) -> None:
    if condition:
        raise RankwiseError(message)


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse the embedded model's flags next to ``--model`` (for parsers whose ``--preset``
    defaults to None, i.e. given only when the user typed it)."""
    if args.model:
        refuse(args.preset is not None, "--preset sizes the embedded model; drop it with --model")
        refuse(getattr(args, "base_steps", None) is not None,
               "--base-steps chooses the embedded base; drop it with --model")


def run_config(args: argparse.Namespace) -> RunConfig:
    steps = args.steps
    eval_every = args.eval_steps or max(1, steps // 6)
    return RunConfig(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_every=eval_every,
                     eval_batches=8, warmup_steps=min(10, steps // 10), early_step=eval_every, seed=args.seed,
                     dtype=args.dtype, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
                     device=args.device)


def make_workload(args: argparse.Namespace, split: str, config: RunConfig, *, from_base: bool) -> Workload:
    """The embedded model (``--preset``) on the embedded ``split`` or the user's ``--data``; or the
    user's ``--model`` on ``--data``."""
    from rankwise.bench import embedded_workload, user_workload

    refuse(bool(args.model) and not args.data, "--model needs --data: give the .txt / .jsonl files to train your "
           "model on (without --model, --data trains the embedded model on your text)")
    if args.model:
        workload = user_workload(args.model, args.data, config)
    else:
        workload = embedded_workload(split, args.preset or DEFAULT_PRESET, config, from_base=from_base,
                                     base_steps=getattr(args, "base_steps", None), data_files=args.data,
                                     progress=not getattr(args, "no_progress", False))
    return workload


def optimizer_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--optim-args`` and the optimizer flags as ``rankwise.optim.build`` keywords (each checked
    there against the optimizer's declarations)."""
    options = optim_options(args)
    if getattr(args, "loraplus_lr_ratio", None) is not None:
        refuse("loraplus_lr_ratio" in options, "loraplus_lr_ratio given twice (--optim-args and --loraplus-lr-ratio)")
        options["loraplus_lr_ratio"] = args.loraplus_lr_ratio
    return options


def method_optimizer(args: argparse.Namespace, method_flag: str) -> tuple[str | None, dict[str, Any]]:
    """``(optimizer, its build options)`` for a set-up whose method is ``method_flag`` (an adapter
    or a parametrisation): the optimizer trains what the method made trainable. ``--rank`` is the
    method's; an optimizer rank goes in ``--optim-args rank=N``. None: plain AdamW."""
    options = optimizer_options(args)
    targets = options.pop("targets")
    refuse(targets != "all-linear",
           f"--optim-target-modules chooses the layers an optimizer projects when it trains the model's weights; with "
           f"{method_flag} it trains the method's parameters (choose the method's layers with its own flags)")
    name = args.optim if (args.optim != "adamw" or options) else None
    if name is not None:
        from rankwise import optim

        optim.OPTIMIZERS.entry(name)  # an unknown name: RankwiseError listing the known ones, before training
    return name, options


def optim_setup(args: argparse.Namespace, name: str, default_lr: float, *, method_args: bool = False) -> SetUp:
    """The optimizer set-up of ``--optim`` and its flags; with ``method_args`` the optimizer is the
    command's method and ``--method-args`` are its options too."""
    options = optimizer_options(args)
    refuse("loraplus_lr_ratio" in options,
           "loraplus_lr_ratio raises the learning rate of adapters' B factors; it needs --method (e.g. lora)")
    if method_args and args.method_args:
        typed = method_values("optim", args.optim, args.method_args)
        repeated = sorted(set(typed) & set(options))
        if repeated:
            raise RankwiseError(f"{', '.join(repeated)} given twice (--method-args and another optimizer flag); give it once")
        options.update(typed)
    lr = default_lr if args.lr is None else args.lr
    if args.optim == "adamw" and options == {"targets": "all-linear"} and args.rank is None:
        return SetUp(name, "full", lr=lr)
    rank_in_optim_args = options.pop("rank", None)
    rank = args.rank if args.rank is not None else rank_in_optim_args
    return SetUp(name, "optim", args.optim, lr=lr, rank=rank, options=options)


# ---- running -----------------------------------------------------------------------------------


def train_and_report(setup: SetUp, workload: Workload, config: RunConfig, args: argparse.Namespace,
                     checkpointing: Checkpointing | None = None, hooks=()):
    """Train ``setup`` (with a progress bar unless ``--no-progress``), print its table; return ``(row, model)``.
    ``hooks``: training-loop hooks (e.g. the gradient-rank callback)."""
    from tqdm.auto import tqdm

    from rankwise.bench.report import format_table

    if workload.data_how:
        print(f"data: {workload.data_how}")
    with tqdm(total=config.steps, desc=setup.name, unit="step", disable=args.no_progress) as bar:
        if args.resume:
            bar.update(_resumed_step(args.resume))
        row, model = run_setup(setup, workload, config, progress=bar, checkpointing=checkpointing,
                               resume_from=args.resume, hooks=hooks)
    title = f"== {setup.name} on {workload.name} =="
    if row.get("resumed_from_step"):
        title += f" (resumed from step {row['resumed_from_step']})"
    print(format_table([row], title=title))
    if row.get("peak_memory_mb") is not None:
        details = [row["precision"]] + ([f"{config.gradient_checkpointing} gradient checkpointing"]
                                        if config.gradient_checkpointing else [])
        print(f"peak memory {row['peak_memory_mb']:.1f} MB ({', '.join(details)})")
    return row, model


def _resumed_step(directory: str) -> int:
    from rankwise.training import read_training_state

    return read_training_state(directory)["step"]


def check_out_path(out: Path) -> None:
    """Refuse an output path that cannot be a directory, before anything is trained."""
    refuse(out.exists() and not out.is_dir(), f"--out {out} exists and is not a directory; choose a directory path")
    for parent in out.parents:
        if parent.exists():
            refuse(not parent.is_dir(), f"--out {out}: {parent} is a file, not a directory; choose another path")
            break
