"""A small name -> object registry (fvcore style).

Attacks, defenses (strategies), datasets, models and synthetic-data sources are
registered by name; a new one is one file and one ``@REGISTRY.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Map names to objects.

    Parameters
    ----------
    kind : str
        What is registered (used in error messages), e.g. ``"attack"``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator registering its argument under ``name``."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered under ``name``.

        Raises
        ------
        KeyError
            With the list of known names when ``name`` is unknown.
        """
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def param_defaults(self, base: dict[str, object] | None = None) -> dict[str, object]:
        """Merge the ``params`` (run-config key -> default) declared by every registered item.

        A key may be shared by several items only with one default; otherwise ``ValueError``.
        """
        out = dict(base or {})
        for name in self.names():
            for key, value in getattr(self._items[name], "params", {}).items():
                if key in out and out[key] != value:
                    raise ValueError(f"{self.kind} parameter {key!r} declared twice with different defaults")
                out[key] = value
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
