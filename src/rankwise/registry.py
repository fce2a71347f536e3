"""One registry type shared by every pillar (adapters, optimizers, parametrisations, ...).

A method module registers its class with a decorator that carries the method's metadata::

    ADAPTERS = Registry("adapter method")

    @ADAPTERS.register("lora", family="lora", paper="LoRA: Low-Rank Adaptation of Large
                       Language Models", arxiv="2106.09685")
    class LoraLayer(AdapterLayer): ...

and the pillar's package imports the module so the registration runs. Lookups of an
unknown name raise a :class:`RankwiseError` that lists the known names. The listing
(:meth:`Registry.names`, :meth:`Registry.entries`) drives the tests (every registered
method must have a test row), the benchmark and ``rankwise methods``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from rankwise.errors import RankwiseError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered method: its name, the registered object and what is known about it.

    ``family`` groups methods that share a family module; ``paper`` / ``arxiv`` cite it
    (``arxiv`` empty for papers without one); ``supports`` lists capabilities a pillar
    defines (layer types an adapter takes, ``"layerwise"`` for an optimizer, ...);
    ``needs_data`` says whether it reads calibration / training data before it starts.
    """

    name: str
    obj: T
    family: str
    paper: str
    arxiv: str = ""
    needs_data: bool = False
    supports: frozenset[str] = field(default_factory=frozenset)

    @property
    def citation(self) -> str:
        return f"{self.paper} (arXiv {self.arxiv})" if self.arxiv else self.paper


class Registry(Generic[T]):
    """A name -> :class:`Entry` table with helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        *,
        family: str,
        paper: str,
        arxiv: str = "",
        needs_data: bool = False,
        supports: tuple[str, ...] | frozenset[str] = (),
    ) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, family, paper, arxiv, needs_data, frozenset(supports))
            return obj

        return decorator

    def entry(self, name: str) -> Entry[T]:
        if not isinstance(name, str) or name not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise RankwiseError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self, pattern: str | None = None, **where: Any) -> list[str]:
        """Sorted names, optionally those matching a shell-style ``pattern`` (``"lora*"``) and
        whose entries have the given field values (``family="galore"``, ``needs_data=False``)."""
        return [entry.name for entry in self.entries(pattern, **where)]

    def entries(self, pattern: str | None = None, **where: Any) -> list[Entry[T]]:
        unknown = sorted(set(where) - set(Entry.__dataclass_fields__))
        if unknown:
            raise RankwiseError(f"cannot filter {self.kind}s by {', '.join(unknown)}")
        chosen = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
                continue
            if all(getattr(entry, key) == value for key, value in where.items()):
                chosen.append(entry)
        return chosen

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
