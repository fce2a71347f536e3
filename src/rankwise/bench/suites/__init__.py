"""The benchmark suites: tables of set-ups trained side by side on the same data and seed.

One module per suite in this package, each with ``SETUPS`` (its rows) and ``WORKLOAD`` (the
embedded corpus split it trains on, and whether set-ups start from the cached base). Adding a
method to the benchmark is one row in its suite's module; adding a suite is one module here
and its name in ``SUITE_MODULES``. A suite that measures something other than training runs
(the compress suite's ratio-vs-quality sweep) also defines ``run(context: SuiteRun) -> list
of files written``, called after its set-ups train (a suite without set-ups -- speed, memory
-- runs its hook only: no workload is prepared). A plain ``rankwise bench`` runs the ``default=True`` rows
of the pretrain and finetune suites; naming a suite (``--suite``) or ``--preset full`` runs
all its rows, ``--setups`` exactly the rows named.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rankwise.bench.setup import SetUp, StepFraction
from rankwise.errors import RankwiseError

SUITE_MODULES = ("pretrain", "optim", "finetune", "compress", "speed", "memory")

_modules = {name: importlib.import_module(f"{__name__}.{name}") for name in SUITE_MODULES}
SUITES: dict[str, list[SetUp]] = {name: module.SETUPS for name, module in _modules.items()}
#: suite -> (embedded corpus split, whether set-ups start from the cached base checkpoint)
SUITE_WORKLOAD: dict[str, tuple[str, bool]] = {name: module.WORKLOAD for name, module in _modules.items()}


@dataclass(frozen=True)
class SuiteRun:
    """What a suite's own ``run`` hook is given: the run's configuration, models and output directory."""

    config: Any  # rankwise.bench.runner.RunConfig
    model_preset: str
    out: Path
    base_steps: int | None = None
    model_dir: str | None = None
    data_files: Sequence[str] | None = None
    progress: bool = True


#: suite -> its ``run`` hook, for the suites that define one
SUITE_RUNS: dict[str, Callable[[SuiteRun], list[Path]]] = {
    name: module.run for name, module in _modules.items() if hasattr(module, "run")}


def select_setups(suite: str, names: list[str] | None, include_all: bool) -> list[SetUp]:
    """The set-ups of ``suite`` to run: those named, else the default ones (or all)."""
    if suite not in SUITES:
        raise RankwiseError(f"unknown suite {suite!r}; known: {', '.join(sorted(SUITES))}")
    table = SUITES[suite]
    if names:
        known = {s.name: s for s in table}
        missing = [n for n in names if n not in known]
        if missing:
            raise RankwiseError(f"suite {suite!r} has no set-up {missing}; it has: {', '.join(known)}")
        return [known[n] for n in names]
    return [s for s in table if include_all or s.default]


__all__ = ["SUITES", "SUITE_RUNS", "SUITE_WORKLOAD", "SetUp", "StepFraction", "SuiteRun", "select_setups"]
