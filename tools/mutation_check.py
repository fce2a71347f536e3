"""Mutation check: does the test suite catch known-bad changes to the code?

    python tools/mutation_check.py            # every mutation
    python tools/mutation_check.py --list     # their names
    python tools/mutation_check.py --only NAME [--only NAME ...]

Each entry of ``MUTATIONS`` names a file, an exact piece of its text, the bad replacement and
the tests that should catch it (pytest arguments: node ids, files, ``-k`` expressions; a
targeted subset, so the whole check takes minutes). For every mutation the script copies the
tracked tree (``git ls-files``, as it is in the working tree) to a scratch directory, makes
the one replacement there and runs the tests with ``PYTHONPATH`` pointing at the copy's
``src`` (it checks that the copy's ``rankwise`` is the one imported). The mutation is
*caught* when pytest reports failing tests (exit status 1); passing tests, a usage error
(a test id that does not exist), no tests collected or a timeout are *not caught*. First,
the tests of all selected mutations run once on an unmutated copy and must pass, or
"caught" would mean nothing.

The exit status is 1 when any mutation is not caught, when a mutation's original text is
not in its file exactly once (a refactor moved the code: update the entry, never let it
pass silently) or when the unmutated baseline fails; 0 otherwise.

Adding a mutation is one ``Mutation(...)`` entry in ``MUTATIONS``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class Mutation:
    """A known-bad change: in ``file`` (relative to the repository), ``original`` (which must
    occur exactly once) becomes ``replacement``; ``tests`` (pytest arguments) must then fail."""

    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


MUTATIONS: list[Mutation] = [
    # ---- compression
    Mutation("svd compression keeps the bottom singular vectors", "src/rankwise/linalg/svd.py",
             "u, s, vh = svd(matrix, dtype=dtype)\n        return u[:, :rank], s[:rank], vh[:rank]",
             "u, s, vh = svd(matrix, dtype=dtype)\n        return u[:, -rank:], s[-rank:], vh[-rank:]",
             ("tests/test_compress.py", "-k", "weight_error or discarded")),
    Mutation("compress bookkeeping counts one factor only", "src/rankwise/compress/core.py",
             "self.ranks[k] * (m + n) for k, (m, n) in self.shapes.items()",
             "self.ranks[k] * max(m, n) for k, (m, n) in self.shapes.items()",
             ("tests/test_compress.py", "-k", "bookkept")),
    Mutation("rank for a ratio rounds up (over budget)", "src/rankwise/compress/core.py",
             "max(1, math.floor(ratio * out_features * in_features / (out_features + in_features)))",
             "max(1, math.ceil(ratio * out_features * in_features / (out_features + in_features)))",
             ("tests/test_compress.py", "-k", "bookkept or discarded")),
    Mutation("svd ignores its niter option", "src/rankwise/compress/svd.py",
             'niter = self.options["niter"]', "niter = None",
             ("tests/test_compress.py", "-k", "randomized")),
    # ---- pretraining parametrisations
    Mutation("lowrank init variance forgets the rank", "src/rankwise/pretrain/lowrank.py",
             "std_down = math.sqrt(sigma * math.sqrt(m / (n * r)))", "std_down = math.sqrt(sigma * math.sqrt(m / n))",
             ("tests/test_pretrain.py", "-k", "variance")),
    Mutation("lowrank factors frozen", "src/rankwise/pretrain/lowrank.py",
             "module = FactorizedLinear.from_factors(up.to(weight.dtype), down.to(weight.dtype), bias)",
             "module = FactorizedLinear.from_factors(up.to(weight.dtype), down.to(weight.dtype), bias)"
             ".requires_grad_(False)",
             ("tests/test_pretrain.py", "-k", "formula or learn")),
    Mutation("relora merge forgets the LoRA scaling", "src/rankwise/pretrain/relora.py",
             "self.weight.add_(self.scaling * (self.lora_B.weight @ self.lora_A.weight))",
             "self.weight.add_(self.lora_B.weight @ self.lora_A.weight)",
             ("tests/test_pretrain_methods.py", "-k", "relora_restart_keeps")),
    Mutation("relora pruning keeps the smallest moments", "src/rankwise/pretrain/relora.py",
             "return tensor * (tensor.abs().float() > threshold).to(tensor.dtype)",
             "return tensor * (tensor.abs().float() <= threshold).to(tensor.dtype)",
             ("tests/test_pretrain_methods.py", "-k", "prune")),
    Mutation("jagged schedule never re-warms after a restart", "src/rankwise/pretrain/schedules.py",
             "if last is not None and restart_warmup_steps and step - last < restart_warmup_steps:",
             "if False:",
             ("tests/test_pretrain_methods.py", "-k", "jagged")),
    Mutation("sltrain saves the dense weight for backward (plain autograd)", "src/rankwise/pretrain/sltrain.py",
             "out = SparsePlusLowRank.apply(x, self.up.weight, self.down.weight, self.values, self.support, self.scaling)",
             "out = x @ self.dense_weight().T",
             ("tests/test_pretrain_methods.py", "-k", "no_dense_matrix")),
    Mutation("sltrain sparse gradient read at the wrong entries", "src/rankwise/pretrain/sltrain.py",
             "grad_values = grad_weight.view(-1)[support].to(values.dtype)",
             "grad_values = grad_weight.view(-1)[support.flip(0)].to(values.dtype)",
             ("tests/test_pretrain_methods.py", "-k", "sltrain_gradients")),
    Mutation("lost keeps the weakest residual channels", "src/rankwise/pretrain/lost.py",
             "channels = residual.norm(dim=0).topk(count).indices.sort().values",
             "channels = residual.norm(dim=0).topk(count, largest=False).indices.sort().values",
             ("tests/test_pretrain_methods.py", "-k", "lost")),
    Mutation("structured_ffn leaves the dropped guide in the optimizer", "src/rankwise/pretrain/structured_ffn.py",
             'group["params"] = [p for p in group["params"] if p is not weight]',
             'group["params"] = list(group["params"])',
             ("tests/test_pretrain_methods.py", "-k", "self_guided")),
    Mutation("monarch projection keeps one term per block", "src/rankwise/pretrain/blocks.py",
             "count = min(len(terms), sv.numel())", "count = 1",
             ("tests/test_pretrain_methods.py", "-k", "project_monarch")),
    Mutation("sst trains U with the natural gradient", "src/rankwise/pretrain/sst.py",
             "grad_u = flat_grad.T @ flat_h if ctx.needs_input_grad[1] else None",
             "grad_u = flat_grad.T @ (flat_h * sigma) if ctx.needs_input_grad[1] else None",
             ("tests/test_pretrain_methods.py", "-k", "enhanced")),
    Mutation("sst samples by magnitude alone", "src/rankwise/pretrain/sst.py",
             "return 0.5 * (1.0 / sigma.numel() + magnitude)", "return magnitude",
             ("tests/test_pretrain_methods.py", "-k", "sampling_law")),
    Mutation("refactorisation gives all of S to one factor", "src/rankwise/pretrain/refactor.py",
             "new_up, new_down = split_singular_values(q_up @ u, s, vh @ q_down.T)",
             "new_up, new_down = (q_up @ u) * s, vh @ q_down.T",
             ("tests/test_pretrain_methods.py", "-k", "rebalance or refactor")),
    # ---- diagnostics
    Mutation("effective rank drops RankMe's 1e-7", "src/rankwise/analyze/rankme.py",
             "p = singular_values / singular_values.sum() + RANKME_EPS", "p = singular_values / singular_values.sum()",
             ("tests/test_analyze.py", "-k", "known_answer")),
    Mutation("stable rank divides by sigma_1, not its square", "src/rankwise/analyze/numerical_rank.py",
             "/ singular_values.max() ** 2", "/ singular_values.max()",
             ("tests/test_analyze.py", "-k", "known_answer")),
    Mutation("model_report's spectral norm is the smallest singular value", "src/rankwise/analyze/norms.py",
             "return float(singular_values.double().max())", "return float(singular_values.double().min())",
             ("tests/test_analyze.py", "-k", "model_report")),
    # ---- the training loop
    Mutation("training loop drops the hooks' loss terms", "src/rankwise/training.py",
             "total = loss if regularizer is None else loss + regularizer", "total = loss",
             ("tests/test_training.py", "-k", "hooks")),
    Mutation("training loop's after_step runs with the previous step number", "src/rankwise/training.py",
             "hook.after_step(model, step=step, total_steps=steps, optimizer=optimizer)",
             "hook.after_step(model, step=step - 1, total_steps=steps, optimizer=optimizer)",
             ("tests/test_training.py", "-k", "hooks")),
    Mutation("accumulation window summed instead of averaged", "src/rankwise/training.py",
             '(total / getattr(optimizer, "accumulation_steps", 1)).backward()', "total.backward()",
             ("tests/test_training.py", "-k", "micro_batches")),
    Mutation("evaluation weighs every batch the same", "src/rankwise/training.py",
             "total += float(loss) * tokens\n                count += tokens",
             "total += float(loss)\n                count += 1",
             ("tests/test_training.py", "-k", "evaluate_weights")),
    Mutation("cosine schedule decays to zero instead of the floor", "src/rankwise/training.py",
             "return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))",
             "return (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))",
             ("tests/test_training.py", "-k", "cosine")),
    # ---- the bench
    Mutation("bench adapter set-ups install no training hooks", "src/rankwise/bench/kinds.py",
             "return Prepared(optimizer, (AdapterHooks(),))", "return Prepared(optimizer)",
             ("tests/test_bench.py", "-k", "adapter_hooks")),
    Mutation("bench parametrisations are not installed as hooks", "src/rankwise/bench/kinds.py",
             "return Prepared(optimizer, (method,), method.schedule)",
             "return Prepared(optimizer, (), method.schedule)",
             ("tests/test_bench.py", "-k", "installed_as_a_training_hook")),
    Mutation("bench ignores a parametrisation's own schedule", "src/rankwise/bench/runner.py",
             "scheduler = (prepared.schedule or cosine_schedule)(", "scheduler = (cosine_schedule)(",
             ("tests/test_bench_sweep.py", "-k", "own_schedule")),
    Mutation("sweep reports on the split it chose the lr on", "src/rankwise/bench/sweep.py",
             "report_loss = evaluate(model, report) if model is not None else None",
             "report_loss = evaluate(model, workload.eval_data) if model is not None else None",
             ("tests/test_bench_sweep.py", "-k", "grid_then_the_chosen")),
    Mutation("sweep claims an ordering from the mean gap alone", "src/rankwise/bench/sweep.py",
             "if all(g > 0 for g in gaps) and mean > 2 * error:", "if mean > 0:",
             ("tests/test_bench_sweep.py", "-k", "orderings")),
    # ---- the command line
    Mutation("compress command drops --method-args", "src/rankwise/cli/commands.py",
             "targets=parse_targets(args.targets), **options)", "targets=parse_targets(args.targets))",
             ("tests/test_cli.py", "-k", "reach_the_compressor")),
]


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def copy_tree(files: list[str], destination: Path) -> None:
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def check_imports_the_copy(copy: Path) -> None:
    found = subprocess.run([sys.executable, "-c", "import rankwise; print(rankwise.__file__)"], cwd=copy,
                           env=environment(copy), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to((copy / "src").resolve()):
        raise SystemExit(f"the scratch copy's rankwise is not the one imported ({found}); check PYTHONPATH")


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int | None, str]:
    """pytest's exit status (None on timeout) and the tail of its output."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True,
                              timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT_SECONDS} s"
    return done.returncode, "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])


def apply(mutation: Mutation, copy: Path) -> str | None:
    """Make the replacement in ``copy``; the reason it cannot be made, or None."""
    path = copy / mutation.file
    if not path.is_file():
        return f"{mutation.file} does not exist"
    text = path.read_text()
    count = text.count(mutation.original)
    if count != 1:
        return f"the original text occurs {count} times in {mutation.file} (expected once): update the entry"
    path.write_text(text.replace(mutation.original, mutation.replacement))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name}  [{mutation.file}; {' '.join(mutation.tests)}]")
        return 0
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = sorted(set(args.only or ()) - {m.name for m in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; see --list")

    files = tracked_files()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="rankwise-mutation-") as scratch:
        baseline = Path(scratch) / "baseline"
        copy_tree(files, baseline)
        check_imports_the_copy(baseline)
        selections = list(dict.fromkeys(m.tests for m in chosen))
        for tests in selections:
            status, tail = run_tests(baseline, tests)
            if status != 0:
                print(f"BASELINE FAILS  {' '.join(tests)} (pytest exit {status}): {tail}")
                return 1
        print(f"baseline: the {len(selections)} test selections pass unmutated")
        for index, mutation in enumerate(chosen):
            copy = Path(scratch) / f"mutant-{index}"
            copy_tree(files, copy)
            started = time.perf_counter()
            problem = apply(mutation, copy)
            if problem is not None:
                verdict = f"ORIGINAL NOT FOUND ({problem})"
            else:
                status, tail = run_tests(copy, mutation.tests)
                verdict = {1: "caught"}.get(status, f"NOT caught (pytest exit {status}: {tail})")
            shutil.rmtree(copy, ignore_errors=True)
            failures += verdict != "caught"
            print(f"{mutation.name}: {verdict}  ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"{len(chosen) - failures} of {len(chosen)} mutations caught")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
