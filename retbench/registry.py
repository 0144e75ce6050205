"""One generic registry for every kind of plug-in: tasks, adapters, protocols, metrics.

Entries register where they are defined (``@REGISTRY.register("name")``), may be lazy
(``"package.module:Attr"`` strings imported on first use), and third-party packages can
add entries through an entry-point group. Unknown names get "did you mean" suggestions.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from retbench.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object mapping with lazy entries, globbing and helpful errors."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T | str] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; used bare or as a decorator."""
        if obj is not None:
            self._add(name, obj)
            return obj

        def decorator(item: T) -> T:
            self._add(name, item)
            return item

        return decorator

    def register_lazy(self, name: str, target: str) -> None:
        """Register ``"module:Attr"`` to be imported the first time ``name`` is used."""
        if ":" not in target:
            raise ValueError(f"lazy {self.kind} target must be 'module:Attr', got {target!r}")
        self._add(name, target)

    def _add(self, name: str, obj: T | str) -> None:
        existing = self._items.get(name)
        if existing is not None and existing is not obj and not isinstance(existing, str):
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = obj

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            self._items.setdefault(ep.name, ep.value)

    def get(self, name: str) -> T:
        """Return the entry called ``name`` or raise with suggestions."""
        self._load_entry_points()
        if name not in self._items:
            raise UnknownNameError(self.unknown_message(name))
        item = self._items[name]
        if isinstance(item, str):
            module, _, attr = item.partition(":")
            item = getattr(importlib.import_module(module), attr)
            self._items[name] = item
        return item

    def unknown_message(self, name: str) -> str:
        """A one-line message for an unknown name with close matches."""
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} '{name}'{hint} (see `retbench list {self.kind}s`)"

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names, sorted, filtered by a glob ``pattern``."""
        self._load_entry_points()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
