"""One registry per kind of part. A name is defined once, next to the code it names."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table that refuses duplicates and explains unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        _load_plugins()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        _load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        _load_plugins()
        return name in self._items


ENCODERS: Registry = Registry("encoder")
CONNECTORS: Registry = Registry("connector")
TEMPLATES: Registry = Registry("chat template")

_loaded = False


def _load_plugins() -> None:
    """Import the modules that register parts (encoders, templates, the connectors package)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import connectors  # noqa: F401  (each module in it registers itself)
    import vlmkit.data.conversation  # noqa: F401
    import vlmkit.encoders  # noqa: F401
