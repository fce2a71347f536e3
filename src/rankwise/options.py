"""One way to declare a method's options, in every pillar.

A method (adapter, optimizer, parametrisation, compressor, diagnostic) declares each of
its keyword options once, as an :class:`Option` in the class attribute ``OPTIONS``::

    OPTIONS = {
        "niter": Option(None, int, low=0, nullable=True,
                        help="power iterations of a randomized SVD; None = exact SVD"),
        "mode": Option("ipm", str, choices=("ipm", "kpm"), help="which singular directions train"),
    }

The pillar's base class checks every value against its declaration once (:func:`resolve`),
so method code never repeats an ``isinstance`` chain. The same declarations feed the error
messages (which say what is accepted), ``rankwise <command> --help-method NAME``
(:func:`describe`) and ``--method-args k=v,...`` on the command line (:func:`parse_assignments`
+ :meth:`Option.parse`). Options declared by a class and by its bases are merged along the
MRO (:func:`declared_options`), subclasses overriding.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Iterable, Mapping

from rankwise.errors import RankwiseError

_KIND_WORDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
               tuple: "a sequence", dict: "a mapping"}


@dataclass(frozen=True)
class Option:
    """A declared option: default, kind, bounds or choices, and one line of help.

    ``kind`` is ``bool``, ``int``, ``float`` (an int is accepted and converted), ``str``,
    ``tuple`` (any list or tuple, stored as a tuple; ``item`` and ``length`` constrain it) or
    ``dict``. ``low`` / ``high`` bound numbers (inclusive unless ``low_open`` / ``high_open``);
    for ``tuple`` kinds they bound every item. ``choices`` restricts the values.
    ``nullable`` admits None (``help`` should say what None means). Floats must be finite.
    """

    default: Any
    kind: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    item: type | None = None
    length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KIND_WORDS:
            raise TypeError(f"Option kind must be one of {', '.join(k.__name__ for k in _KIND_WORDS)}")
        if self.default is not None or not self.nullable:
            self.check("default", self.default)  # a declaration bug, caught at import

    # ---- checking

    def expectation(self) -> str:
        """What the option accepts, in words: ``an integer >= 1``, ``one of 'ipm', 'kpm'``, ..."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind is tuple:
            items = _KIND_WORDS[self.item].split(" ", 1)[1] + "s" if self.item else "values"
            count = f"{self.length} " if self.length else ""
            text = f"a sequence of {count}{items}{self._bounds()}"
        else:
            text = _KIND_WORDS[self.kind] + self._bounds()
        return f"None or {text}" if self.nullable else text

    def _bounds(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        if low and high and self.kind is not tuple:
            return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        parts = [p for p in (low, high) if p]
        return (" " + " and ".join(parts)) if parts else ""

    def check(self, name: str, value: Any, owner: str = "") -> Any:
        """``value`` normalised (int -> float for floats, list -> tuple), or RankwiseError saying
        what ``name`` accepts."""
        if value is None and self.nullable:
            return None
        normalised = self._normalise(value)
        if normalised is _INVALID:
            where = f"{owner}: " if owner else ""
            raise RankwiseError(f"{where}option {name} must be {self.expectation()}, got {value!r}")
        return normalised

    def _normalise(self, value: Any) -> Any:
        if self.kind is tuple:
            if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
                return _INVALID
            items = tuple(_scalar(self.item, v) if self.item else v for v in value)
            if any(v is _INVALID or not self._in_bounds(v) for v in items):
                return _INVALID
            result: Any = items
        else:
            result = _scalar(self.kind, value)
            if result is _INVALID or not self._in_bounds(result):
                return _INVALID
        if self.choices is not None and result not in self.choices:
            return _INVALID
        return result

    def _in_bounds(self, value: Any) -> bool:
        if not isinstance(value, Real) or isinstance(value, bool):
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    # ---- the command line

    def parse(self, name: str, text: str, owner: str = "") -> Any:
        """A value from command-line text (a Python literal, or a bare string), checked."""
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if self.kind is str and not isinstance(value, str) and value is not None:
            value = text  # "--method-args mode=1e3" on a string option keeps the text
        return self.check(name, value, owner)

    def describe(self, name: str) -> str:
        """One line for ``--help-method``: ``name=default  (accepts)  help``."""
        return f"{name}={self.default!r}  ({self.expectation()})  {self.help}"


class _Invalid:
    pass


_INVALID = _Invalid()


def _scalar(kind: type, value: Any) -> Any:
    if kind is bool:
        return value if isinstance(value, bool) else _INVALID
    if isinstance(value, bool):
        return _INVALID
    if kind is int:
        return value if isinstance(value, int) else _INVALID
    if kind is float:
        return float(value) if isinstance(value, Real) and math.isfinite(value) else _INVALID
    if kind is str:
        return value if isinstance(value, str) else _INVALID
    if kind is dict:
        return dict(value) if isinstance(value, Mapping) else _INVALID
    return _INVALID


def declared_options(cls: type) -> dict[str, Option]:
    """Every option ``cls`` and its bases declare in ``OPTIONS`` (subclasses override bases)."""
    merged: dict[str, Option] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("OPTIONS", {}))
    return merged


def resolve(declared: Mapping[str, Option], given: Mapping[str, Any], *, owner: str) -> dict[str, Any]:
    """Defaults overridden by ``given``, every value checked; unknown names raise, listing the accepted ones."""
    refuse_unknown(declared, given, owner=owner)
    values = {name: option.default for name, option in declared.items()}
    for name, value in given.items():
        values[name] = declared[name].check(name, value, owner)
    return values


def refuse_unknown(declared: Mapping[str, Option], given: Iterable[str], *, owner: str) -> None:
    """RankwiseError naming the unknown options in ``given`` and listing the accepted ones with defaults."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        accepted = ", ".join(f"{k}={o.default!r}" for k, o in sorted(declared.items())) or "(no options)"
        raise RankwiseError(
            f"{owner}: unknown option(s) {', '.join(unknown)}; it accepts: {accepted} "
            f"(see `rankwise <command> --help-method NAME`)"
        )


def describe(declared: Mapping[str, Option]) -> list[str]:
    """``--help-method`` lines, one per option, sorted by name."""
    if not declared:
        return ["(no options of its own)"]
    return [declared[name].describe(name) for name in sorted(declared)]


def parse_assignments(text: str | None) -> dict[str, str]:
    """``"k=v,k=v"`` -> ``{k: v}`` (raw text); commas inside brackets or quotes do not split."""
    pairs: dict[str, str] = {}
    for item in _split_top_level(text or ""):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RankwiseError(f"expected key=value pairs separated by commas in {text!r}, got {item!r}")
        pairs[key.strip()] = raw.strip()
    return pairs


def parse_values(declared: Mapping[str, Option], text: str | None, *, owner: str) -> dict[str, Any]:
    """``--method-args`` text parsed and checked against ``declared`` (unknown names raise)."""
    raw = parse_assignments(text)
    refuse_unknown(declared, raw, owner=owner)
    return {name: declared[name].parse(name, value, owner) for name, value in raw.items()}


def _split_top_level(text: str) -> Iterable[str]:
    depth, quote, start = 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            if text[start:index].strip():
                yield text[start:index].strip()
            start = index + 1
    if text[start:].strip():
        yield text[start:].strip()
