"""The learning-rate sweep and the seed repeats behind ``rankwise bench --suite pretrain``.

Every set-up gets the same treatment, so the comparison measures methods, not tuning effort:

1. **Sweep.** Each set-up trains once per learning rate of one shared grid (:class:`SweepConfig`
   ``lr_grid``), seed 0, same model init, same batches, same token budget. When a set-up's best
   lr is an end of the grid, the grid is extended for it by one more value beyond that end (the
   grid's own spacing), up to ``max_extensions`` times -- the same rule for every set-up.
2. **Choice on a held-out split.** The embedded validation stream is cut in two halves: the
   *selection* half scores the sweep (the chosen lr minimises its loss), the *report* half --
   never seen by the choice -- gives the reported perplexity, so the choice cannot flatter it.
   A choice still at an end of the (extended) grid is flagged ("edge": the optimum may lie
   outside it).
3. **Seeds.** The chosen lr is trained again with seeds 1, 2, ... (a seed fixes the model init
   and the batch order, the same for every set-up), and the report perplexity is given as
   mean +- sample standard deviation over the seeds.
4. **Orderings.** :func:`compare` tests a pair of set-ups on their *paired* per-seed report
   losses (same seed = same init and batches): an ordering is claimed only when the sign of the
   difference agrees on every seed and the mean difference exceeds twice its standard error;
   otherwise the pair is "within noise".

Every run is one call of :func:`rankwise.bench.runner.run_setup` (the loop, timing and memory
measurement of every other suite), on one intra-op thread so the losses do not depend on the
thread count and two runs can share two cores (``workers``). Results are cached per run under
``cache_dir()/bench-sweep/`` keyed by the set-up, learning rate, seed, run configuration, model
preset, torch version and a fingerprint of the rankwise sources: a rerun with unchanged code
reads them back, any code change reruns everything. Losses and perplexities do not depend on
machine load; ``ms_per_step`` does, so each run records the load average (``/proc/loadavg``)
it ran under.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import torch

from rankwise.bench.runner import RunConfig, Workload, run_setup
from rankwise.bench.setup import SetUp
from rankwise.errors import LossDiverged, RankwiseError

#: the run fields kept in the cache and the report (the histories are kept for the curves)
RUN_FIELDS = ("trainable_params", "optimizer_state_mb", "peak_memory_mb", "ms_per_step", "init_seconds",
              "final_val_loss", "history")


@dataclass(frozen=True)
class SweepConfig:
    """What one sweep runs: the model preset, the run shape, the lr grid, the seeds, the eval split sizes."""

    model_preset: str
    run: RunConfig
    lr_grid: tuple[float, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    #: batches of each validation half (selection / report)
    eval_batches: int = 8
    workers: int = 2
    #: how many values a set-up's grid may grow by beyond an end its best lr sits at
    max_extensions: int = 2

    def __post_init__(self) -> None:
        if len(self.lr_grid) < 3 or sorted(set(self.lr_grid)) != list(self.lr_grid):
            raise RankwiseError(f"lr_grid needs at least 3 increasing values, got {self.lr_grid}")
        if not self.seeds:
            raise RankwiseError("seeds must hold at least one seed")


@dataclass
class SweepRow:
    """One set-up's sweep: the loss at each lr, the chosen lr, the runs of every seed at it."""

    setup: SetUp
    grid: dict[float, dict[str, Any]] = field(default_factory=dict)
    seeds: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def chosen_lr(self) -> float:
        return min(self.grid, key=lambda lr: _finite(self.grid[lr]["selection_loss"]))

    @property
    def at_edge(self) -> bool:
        lrs = sorted(self.grid)
        return self.chosen_lr in (lrs[0], lrs[-1])

    def report_losses(self) -> list[float]:
        """The report loss of every seed (inf for a seed that diverged)."""
        return [_finite(self.seeds[s]["report_loss"]) for s in sorted(self.seeds)]

    def summary(self, published: dict[str, float] | None = None) -> dict[str, Any]:
        """The row of the final table (figures of the seed-0 run, time and perplexity over the seeds)."""
        first = self.seeds[min(self.seeds)]
        ppls = [_perplexity(loss) for loss in self.report_losses()]
        times = [self.seeds[s]["ms_per_step"] for s in sorted(self.seeds)]
        return {
            "setup": self.setup.name, "kind": self.setup.kind, "method": self.setup.method, "lr": self.chosen_lr,
            "lr_at_edge": self.at_edge, "trainable_params": first["trainable_params"],
            "optimizer_state_mb": first["optimizer_state_mb"], "peak_memory_mb": first["peak_memory_mb"],
            "ms_per_step": statistics.fmean(times), "final_val_loss": statistics.fmean(self.report_losses()),
            "final_val_ppl": statistics.fmean(ppls),
            "ppl_std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0, "seed_ppls": ppls,
            "published_60m": (published or {}).get(self.setup.name),
            "sweep": {f"{lr:g}": self.grid[lr]["selection_loss"] for lr in sorted(self.grid)},
            "history": first["history"], "setup_spec": asdict(self.setup),
        }


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def _perplexity(loss: float | None) -> float:
    return math.exp(loss) if loss is not None and loss < 700 else math.inf


# ----- workloads: the embedded pretraining split with a validation cut in two -----------------


def split_validation(tokens: torch.Tensor, config: SweepConfig) -> tuple[list[dict], list[dict]]:
    """``(selection, report)`` evaluation batches from the two halves of the validation stream."""
    from rankwise.data.batches import eval_batches

    half = tokens.numel() // 2
    shape = {"batch_size": config.run.batch_size, "seq_len": config.run.seq_len, "max_batches": config.eval_batches}
    return eval_batches(tokens[:half], **shape), eval_batches(tokens[half:], **shape)


def embedded_sweep_workload(config: SweepConfig, seed: int) -> tuple[Workload, list[dict]]:
    """The embedded pretraining workload for ``seed`` (fresh init of the preset) and the report batches."""
    from rankwise.data.batches import encode_documents
    from rankwise.data.corpus import load_corpus
    from rankwise.data.models import build_model
    from rankwise.data.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    train_tokens = encode_documents(load_corpus("pretrain", "train"), tokenizer)
    selection, report = split_validation(encode_documents(load_corpus("pretrain", "validation"), tokenizer), config)

    def make_model():
        return build_model(config.model_preset, vocab_size=len(tokenizer), seed=seed)

    hidden = make_model().config.hidden_size
    workload = Workload(f"embedded pretrain / {config.model_preset}", make_model, train_tokens, selection, hidden)
    return workload, report


# ----- one run, cached ----------------------------------------------------------------------------


#: sources that cannot change a run's result (a set-up's own spec is part of the key; of this
#: module only the functions that train and evaluate a run count, see :func:`source_fingerprint`)
_NOT_FINGERPRINTED = ("bench/suites/", "cli/", "bench/report.py", "bench/sweep.py")


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 over the rankwise sources a run executes: every module but the suite tables, the
    command line and the report, plus, of this module, the functions that train and score one run
    (the choice of lr and the tables can change without invalidating the cache)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if str(path.relative_to(root)).startswith(_NOT_FINGERPRINTED):
            continue
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    for function in (split_validation, embedded_sweep_workload, train_one):
        digest.update(inspect.getsource(function).encode())
    digest.update(repr(RUN_FIELDS).encode())
    return digest.hexdigest()[:16]


def run_key(setup: SetUp, lr: float, seed: int, config: SweepConfig) -> str:
    spec = {"setup": asdict(replace(setup, lr=lr, default=True)), "seed": seed, "run": asdict(replace(config.run, seed=seed)),
            "model": config.model_preset, "eval_batches": config.eval_batches, "torch": torch.__version__,
            "threads": 1, "code": source_fingerprint()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def _load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


_WORKLOADS: dict[tuple[str, int], tuple[Workload, list[dict]]] = {}


def train_one(setup: SetUp, lr: float, seed: int, config: SweepConfig, workload_factory=None) -> dict[str, Any]:
    """Train ``setup`` at ``lr`` with ``seed``; return its measurements, the selection and report losses."""
    from rankwise.training import evaluate

    factory = workload_factory or embedded_sweep_workload
    key = (repr(factory), seed)
    if key not in _WORKLOADS:
        _WORKLOADS.clear()  # one seed's workload at a time
        _WORKLOADS[key] = factory(config, seed)
    workload, report = _WORKLOADS[key]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before = _load_average()
    started = time.perf_counter()
    diverged_at = None
    try:
        row, model = run_setup(replace(setup, lr=lr), workload, replace(config.run, seed=seed))
        report_loss = evaluate(model, report) if model is not None else None
    except LossDiverged as exc:  # an lr too high for this set-up: a result of the sweep, not an error
        row, report_loss, diverged_at = {"history": []}, None, exc.step
    finally:
        torch.set_num_threads(threads)
    result = {name: row.get(name) for name in RUN_FIELDS}
    result.update(selection_loss=row.get("final_val_loss"), report_loss=report_loss, lr=lr, seed=seed,
                  diverged_at_step=diverged_at, seconds=time.perf_counter() - started,
                  load_average=[load_before, _load_average()])
    return result


def _worker_init() -> None:
    torch.set_num_threads(1)


def _cache_path(cache: Path | None, key: str) -> Path | None:
    return None if cache is None else cache / f"{key}.json"


def _run_all(jobs: list[tuple[SetUp, float, int]], config: SweepConfig, cache: Path | None, log,
             workload_factory=None) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    pending = []
    for index, (setup, lr, seed) in enumerate(jobs):
        path = _cache_path(cache, run_key(setup, lr, seed, config))
        if path is not None and path.is_file():
            results[index] = json.loads(path.read_text())
            loss = results[index]["selection_loss"]
            log(f"  {setup.name} lr {lr:g} seed {seed}: cached, "
                + ("diverged" if loss is None else f"selection loss {loss:.4f}"))
        else:
            pending.append(index)

    def finish(index: int, result: dict[str, Any]) -> None:
        setup, lr, seed = jobs[index]
        results[index] = result
        path = _cache_path(cache, run_key(setup, lr, seed, config))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(".tmp")
            staging.write_text(json.dumps(result))
            os.replace(staging, path)
        if result.get("diverged_at_step") is not None:
            log(f"  {setup.name} lr {lr:g} seed {seed}: diverged (non-finite loss at step "
                f"{result['diverged_at_step']}), {result['seconds']:.0f} s")
            return
        log(f"  {setup.name} lr {lr:g} seed {seed}: selection loss {result['selection_loss']:.4f}, "
            f"{result['ms_per_step']:.0f} ms/step at load {result['load_average'][0]}, {result['seconds']:.0f} s")

    if config.workers > 1 and len(pending) > 1 and workload_factory is None:
        with ProcessPoolExecutor(max_workers=config.workers, mp_context=get_context("spawn"),
                                 initializer=_worker_init) as pool:
            futures = {pool.submit(train_one, *jobs[i], config): i for i in pending}
            for future in futures:
                finish(futures[future], future.result())
    else:
        for index in pending:
            finish(index, train_one(*jobs[index], config, workload_factory=workload_factory))
    return results  # type: ignore[return-value]


def _beyond_edge(row: SweepRow) -> float | None:
    """The next lr past the end of ``row``'s grid its best lr sits at (the grid's spacing), or None."""
    lrs = sorted(row.grid)
    if not row.at_edge or not math.isfinite(_finite(row.grid[row.chosen_lr]["selection_loss"])):
        return None
    if row.chosen_lr == lrs[0]:
        return lrs[0] * lrs[0] / lrs[1]
    return lrs[-1] * lrs[-1] / lrs[-2]


def run_sweep(setups: Sequence[SetUp], config: SweepConfig, *, cache: Path | None = None, log=print,
              workload_factory=None) -> list[SweepRow]:
    """Sweep every set-up over ``config.lr_grid`` (seed ``seeds[0]``, extended at an end the best lr sits
    at), then repeat the chosen lr on the other seeds."""
    rows = [SweepRow(setup) for setup in setups]
    first, *others = config.seeds
    log(f"sweep: {len(setups)} set-ups x {len(config.lr_grid)} learning rates "
        f"({', '.join(f'{lr:g}' for lr in config.lr_grid)}), seed {first}")
    jobs = [(row.setup, lr, first) for row in rows for lr in config.lr_grid]
    for _ in range(config.max_extensions + 1):
        for (setup, lr, _), result in zip(jobs, _run_all(jobs, config, cache, log, workload_factory)):
            next(r for r in rows if r.setup is setup).grid[lr] = result
        jobs = [(row.setup, beyond, first) for row in rows if (beyond := _beyond_edge(row)) is not None]
        if not jobs:
            break
        log(f"extending the grid at an end for: {', '.join(f'{s.name} ({lr:g})' for s, lr, _ in jobs)}")
    for row in rows:
        row.seeds[first] = row.grid[row.chosen_lr]
    if others:
        log(f"seeds {', '.join(map(str, others))} at each set-up's chosen learning rate")
        seed_jobs = [(row.setup, row.chosen_lr, seed) for row in rows for seed in others]
        for (setup, _, seed), result in zip(seed_jobs, _run_all(seed_jobs, config, cache, log, workload_factory)):
            next(r for r in rows if r.setup is setup).seeds[seed] = result
    return rows


# ----- comparisons and tables ---------------------------------------------------------------------


def compare(better: SweepRow, worse: SweepRow) -> dict[str, Any]:
    """Does ``better`` beat ``worse`` (lower report loss)? Paired over the seeds both ran.

    ``verdict``: "holds" when every seed's difference ``loss(worse) - loss(better)`` is positive and
    the mean difference exceeds twice its standard error; "reversed" for the mirror case; else
    "within noise" (always, with a single seed). A seed that diverged counts as an infinite loss.
    """
    seeds = sorted(set(better.seeds) & set(worse.seeds))
    gaps = [_finite(worse.seeds[s]["report_loss"]) - _finite(better.seeds[s]["report_loss"]) for s in seeds]
    if all(math.isfinite(g) for g in gaps):
        mean = statistics.fmean(gaps)
        error = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else math.inf
    else:  # a seed diverged (infinite loss): only the signs carry information
        mean = math.inf if all(g > 0 for g in gaps) else -math.inf if all(g < 0 for g in gaps) else math.nan
        error = 0.0
    if all(g > 0 for g in gaps) and mean > 2 * error:
        verdict = "holds"
    elif all(g < 0 for g in gaps) and -mean > 2 * error:
        verdict = "reversed"
    else:
        verdict = "within noise"
    ppl_ratio = math.exp(mean)
    return {"better": better.setup.name, "worse": worse.setup.name, "loss_gap": mean, "gap_stderr": error,
            "ppl_ratio": ppl_ratio, "seeds": seeds, "verdict": verdict}


def format_sweep(rows: Sequence[SweepRow]) -> str:
    """The sweep: selection loss at every learning rate, the chosen one marked."""
    lrs = sorted({lr for row in rows for lr in row.grid})
    header = ["set-up"] + [f"lr {lr:g}" for lr in lrs] + ["chosen"]
    body = []
    for row in rows:
        cells = [row.setup.name]
        for lr in lrs:
            run = row.grid.get(lr, {})
            loss = run.get("selection_loss")
            mark = "*" if lr == row.chosen_lr else " "
            cells.append("diverged " if run.get("diverged_at_step") is not None else
                         "-" if loss is None else f"{loss:.4f}{mark}")
        cells.append(f"{row.chosen_lr:g}" + (" (edge)" if row.at_edge else ""))
        body.append(cells)
    return _table(header, body)


def format_summary(rows: Sequence[SweepRow], published: dict[str, float]) -> str:
    """The comparison: report perplexity mean +- std over seeds beside the published 60M column."""
    header = ["set-up", "lr", "trainable", "opt-state MB", "peak MB", "ms/step", "val ppl (mean +- std)",
              "published 60M"]
    body = []
    for row in rows:
        s = row.summary(published)
        body.append([s["setup"], f"{s['lr']:g}" + ("!" if s["lr_at_edge"] else ""), f"{s['trainable_params']:,}",
                     f"{s['optimizer_state_mb']:.2f}", f"{s['peak_memory_mb']:.1f}", f"{s['ms_per_step']:.0f}",
                     f"{s['final_val_ppl']:.2f} +- {s['ppl_std']:.2f}",
                     "-" if s["published_60m"] is None else f"{s['published_60m']:.2f}"])
    return _table(header, body)


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in body]
    return "\n".join(lines)


def format_orderings(rows: Sequence[SweepRow], pairs: Sequence[tuple[str, str]]) -> tuple[str, list[dict[str, Any]]]:
    """Each published ordering ``better <= worse`` tested by :func:`compare`, as text and as records."""
    by_name = {row.setup.name: row for row in rows}
    records = [compare(by_name[a], by_name[b]) for a, b in pairs if a in by_name and b in by_name]
    lines = [f"  {r['better']} <= {r['worse']}: {r['verdict']} (ppl ratio {r['ppl_ratio']:.3f}, loss gap "
             f"{r['loss_gap']:+.4f} +- {r['gap_stderr']:.4f} over seeds {r['seeds']})" for r in records]
    return "\n".join(lines), records


def swept_defaults(rows: Sequence[SweepRow]) -> str:
    """The ``SWEPT_LR`` literal to paste into the suite module (each set-up's chosen lr)."""
    items = "\n".join(f"    {row.setup.name!r}: {row.chosen_lr:g}," for row in rows)
    return "SWEPT_LR: dict[str, float] = {\n" + items + "\n}"


# ----- the suite entry point (rankwise bench --suite <suite with a SWEEP>) ------------------------


def run_suite_sweep(module: Any, preset: str, *, setups: Sequence[str] | None = None, steps: int | None = None,
                    seed: int = 0, out: Path | None = None, cache: bool = True, log=print) -> list[dict[str, Any]]:
    """Run ``module.SWEEP[preset]`` over the suite's rows (or those named), print the sweep, the
    comparison and the orderings, write ``sweep.json`` under ``out``; return the summary rows."""
    from rankwise.cache import cache_dir

    if preset not in module.SWEEP:
        raise RankwiseError(f"the sweep has no preset {preset!r}; known: {', '.join(module.SWEEP)}")
    config = module.SWEEP[preset]
    run = replace(config.run, **({"steps": steps} if steps else {}))
    run = replace(run, eval_every=min(run.eval_every, run.steps), early_step=min(run.early_step, run.steps),
                  warmup_steps=min(run.warmup_steps, run.steps // 10))
    config = replace(config, run=run, seeds=tuple(seed + s for s in config.seeds))
    try:
        chosen = module.sweep_setups(list(setups) if setups else None)
    except KeyError as exc:
        known = ", ".join(row.name for row in module.sweep_setups())
        raise RankwiseError(f"the sweep has no set-up {exc.args[0]!r}; it has: {known}") from None
    started = time.perf_counter()
    load_start = _load_average()
    rows = run_sweep(chosen, config, cache=(cache_dir() / "bench-sweep") if cache else None, log=log)
    wall = time.perf_counter() - started
    log("\n== pretrain sweep: selection loss (first validation half) at each lr; * = chosen ==")
    log(format_sweep(rows))
    log(f"\n== pretrain comparison ({config.model_preset}, {run.steps} steps of {run.batch_size} x {run.seq_len} "
        f"tokens, lr chosen per set-up, perplexity on the second validation half over seeds "
        f"{list(config.seeds)}; ! = lr at the grid's edge) ==")
    log(format_summary(rows, module.PUBLISHED_60M))
    text, orderings = format_orderings(rows, module.ORDERINGS)
    if text:
        log("\npublished orderings (paired over seeds; 'holds' = every seed agrees and the gap > 2 standard errors):")
        log(text)
    log(f"\nbench defaults for {module.__name__} (paste to regenerate):\n{swept_defaults(rows)}")
    log(f"\nsweep wall time {wall:.0f} s (load average {load_start} at the start, {_load_average()} at the end)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        record = {"config": module.describe(config), "wall_seconds": wall, "load_average": [load_start, _load_average()],
                  "rows": [{"setup": r.setup.name, "chosen_lr": r.chosen_lr, "at_edge": r.at_edge,
                            "grid": {f"{lr:g}": {k: v for k, v in res.items() if k != "history"}
                                     for lr, res in sorted(r.grid.items())},
                            "seeds": {str(s): {k: v for k, v in res.items() if k != "history"}
                                      for s, res in sorted(r.seeds.items())}} for r in rows],
                  "orderings": orderings}
        (out / "sweep.json").write_text(json.dumps(record, indent=2))
    return [row.summary(module.PUBLISHED_60M) for row in rows]
