"""One registry type shared by every pillar (adapters, optimizers, parametrisations, ...).

A method module registers itself with a decorator::

    ADAPTERS = Registry("adapter method")

    @ADAPTERS.register("lora")
    class LoraLinear(AdapterLayer): ...

and the pillar's package imports the module so the registration runs. Lookups of an
unknown name raise a :class:`RankwiseError` that lists the known names.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from rankwise.errors import RankwiseError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise RankwiseError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
