"""The layout's rules, checked: registries carry metadata, method modules stay independent,
options are declared in the one form of rankwise.options."""

from __future__ import annotations

import ast
import importlib
import sys

import pytest

import rankwise  # noqa: F401  (imports every pillar, so every method is registered)
from rankwise.adapters import ADAPTERS
from rankwise.analyze import DIAGNOSTICS
from rankwise.compress.core import COMPRESSORS
from rankwise.errors import RankwiseError
from rankwise.optim import OPTIMIZERS
from rankwise.options import Option, declared_options, parse_assignments, parse_values, resolve
from rankwise.pretrain import PARAMETRISATIONS
from rankwise.registry import Registry

REGISTRIES = {
    "adapters": ADAPTERS,
    "optim": OPTIMIZERS,
    "pretrain": PARAMETRISATIONS,
    "compress": COMPRESSORS,
    "analyze": DIAGNOSTICS,
}


def method_modules() -> set[str]:
    return {entry.obj.__module__ for registry in REGISTRIES.values() for entry in registry.entries()}


def imported_modules(module_name: str) -> set[str]:
    """Every rankwise module ``module_name`` imports (``from a.b import c`` counts a.b and a.b.c)."""
    tree = ast.parse(open(sys.modules[module_name].__file__).read())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("rankwise.")}


@pytest.mark.parametrize("module", sorted(method_modules()))
def test_no_method_module_imports_another(module):
    others = method_modules() - {module}
    crossing = sorted(imported_modules(module) & others)
    assert not crossing, f"{module} imports method module(s) {crossing}: move the shared piece into a family module"


@pytest.mark.parametrize("pillar", sorted(REGISTRIES))
def test_every_entry_cites_its_paper_and_family(pillar):
    for entry in REGISTRIES[pillar].entries():
        assert entry.family and entry.paper, entry.name
        assert not entry.arxiv or entry.arxiv.replace(".", "").isdigit(), (entry.name, entry.arxiv)


# ----- the registry ---------------------------------------------------------------------------


def test_registry_filters_by_pattern_and_metadata():
    registry: Registry[int] = Registry("thing")
    registry.register("lora", family="lora", paper="p")(1)
    registry.register("lora_ga", family="data", paper="p", needs_data=True)(2)
    registry.register("vera", family="random", paper="p")(3)
    assert registry.names() == ["lora", "lora_ga", "vera"]
    assert registry.names("lora*") == ["lora", "lora_ga"]
    assert registry.names(needs_data=True) == ["lora_ga"]
    assert registry.names("*a", family="random") == ["vera"]
    with pytest.raises(RankwiseError, match="known: lora, lora_ga, vera"):
        registry.get("dora")
    with pytest.raises(RuntimeError, match="registered twice"):
        registry.register("vera", family="random", paper="p")(4)
    with pytest.raises(RankwiseError, match="cannot filter"):
        registry.names(colour="red")


# ----- options --------------------------------------------------------------------------------


def test_option_checks_kind_bounds_choices_and_none():
    niter = Option(None, int, low=0, nullable=True, help="power iterations; None = exact")
    assert niter.check("niter", 4) == 4 and niter.check("niter", None) is None
    for bad in (-1, 2.0, True, "4"):
        with pytest.raises(RankwiseError, match=r"niter must be None or an integer >= 0"):
            niter.check("niter", bad)
    ratio = Option(0.5, float, low=0, high=1, low_open=True, high_open=True, help="kept share")
    assert ratio.check("ratio", 0.25) == 0.25
    converted = Option(1.0, float, low=0, help="lr").check("lr", 3)
    assert converted == 3.0 and isinstance(converted, float)
    for bad in (0, 1.0, float("nan"), float("inf"), False):
        with pytest.raises(RankwiseError, match=r"in \(0, 1\)"):
            ratio.check("ratio", bad)
    mode = Option("ipm", str, choices=("ipm", "kpm"), help="which directions train")
    with pytest.raises(RankwiseError, match="one of 'ipm', 'kpm'"):
        mode.check("mode", "lpm")
    betas = Option((0.9, 0.999), tuple, item=float, length=2, low=0, high=1, high_open=True, help="Adam betas")
    assert betas.check("betas", [0.5, 0.9]) == (0.5, 0.9)
    assert Option((), tuple, help="any").expectation() == "a sequence of values"
    for bad in ((0.9,), (0.9, 1.0), (0.9, "x"), 0.9):
        with pytest.raises(RankwiseError, match="betas must be a sequence of 2 numbers"):
            betas.check("betas", bad)


def test_an_invalid_default_is_a_declaration_error():
    with pytest.raises(RankwiseError):
        Option(0, int, low=1, help="rank")


def test_resolve_fills_defaults_checks_values_and_lists_accepted_options():
    declared = {"mode": Option("ipm", str, choices=("ipm", "kpm"), help="m"), "damping": Option(0.01, float, low=0, help="d")}
    assert resolve(declared, {"damping": 1}, owner="corda") == {"mode": "ipm", "damping": 1.0}
    with pytest.raises(RankwiseError, match=r"corda: unknown option\(s\) dampng; it accepts: damping=0.01, mode='ipm'"):
        resolve(declared, {"dampng": 0.1}, owner="corda")


def test_declared_options_merge_along_the_mro():
    class Base:
        OPTIONS = {"dropout": Option(0.0, float, low=0, high=1, high_open=True, help="d")}

    class Child(Base):
        OPTIONS = {"rslora": Option(False, bool, help="r")}

    class Grandchild(Child):
        OPTIONS = {"dropout": Option(0.1, float, low=0, high=1, high_open=True, help="d")}

    assert set(declared_options(Child)) == {"dropout", "rslora"}
    assert declared_options(Grandchild)["dropout"].default == 0.1


def test_command_line_assignments_parse_literals_and_keep_strings():
    declared = {
        "mode": Option("ipm", str, choices=("ipm", "kpm"), help="m"),
        "niter": Option(None, int, low=0, nullable=True, help="n"),
        "dims": Option(None, tuple, item=int, nullable=True, help="factors"),
        "whiten": Option(False, bool, help="w"),
    }
    assert parse_assignments("a=1, b=(1,2),c='x,y'") == {"a": "1", "b": "(1,2)", "c": "'x,y'"}
    values = parse_values(declared, "mode=kpm,niter=4,dims=(2,4,4),whiten=True", owner="m")
    assert values == {"mode": "kpm", "niter": 4, "dims": (2, 4, 4), "whiten": True}
    assert parse_values(declared, "niter=None", owner="m") == {"niter": None}
    with pytest.raises(RankwiseError, match="unknown option"):
        parse_values(declared, "nitre=4", owner="m")
    with pytest.raises(RankwiseError, match="expected key=value"):
        parse_values(declared, "niter", owner="m")
    with pytest.raises(RankwiseError, match="whiten must be True or False"):
        parse_values(declared, "whiten=yes", owner="m")


def test_the_pillars_import_cleanly_in_a_fresh_interpreter():
    # importlib.reload would re-register; a fresh import proves registration has no order dependence
    import subprocess

    code = "import rankwise, rankwise.bench, rankwise.cli.main; print(len(rankwise.methods()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(ADAPTERS)
    assert importlib.import_module("rankwise.options").Option is Option
