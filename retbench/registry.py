"""One generic registry for every kind of plug-in: tasks, adapters, protocols, metrics.

Entries register where they are defined (``@REGISTRY.register("name")``), may be lazy
(``"package.module:Attr"`` strings imported on first use), and third-party packages can
add entries through an entry-point group. Unknown names get "did you mean" suggestions.
A registry may hold its entries to a :class:`Contract`: an entry that does not satisfy it is
refused with one line naming the entry and what it lacks (eager entries when registered,
lazy and entry-point ones when first used).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar, cast, overload

from retbench.errors import RetbenchError, UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Contract:
    """What every entry of a registry group must be.

    ``name`` names the contract in errors (the class that defines it). An entry must be a subclass
    of ``subclass_of`` and an instance of ``instance_of`` (when given; a class is no instance, so
    ``object`` asks for any instance), have every attribute of ``members`` and every callable of
    ``methods``, and pass ``check`` (which returns what is wrong, or None).
    """

    name: str
    members: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    subclass_of: type | None = None
    instance_of: type | None = None
    check: Callable[[Any], str | None] | None = None

    @classmethod
    def of_protocol(cls, protocol: type, check: Callable[[Any], str | None] | None = None) -> Contract:
        """The contract of a ``typing.Protocol`` class: its annotated attributes and its methods, on an
        instance (not a class)."""
        members: list[str] = []
        methods: list[str] = []
        for base in reversed(protocol.__mro__):
            if base.__module__ in ("typing", "builtins", "typing_extensions"):
                continue
            members += [n for n in base.__dict__.get("__annotations__", {}) if n not in members]
            methods += [n for n, v in vars(base).items() if callable(v) and not n.startswith("_") and n not in methods]
        return cls(f"{protocol.__module__}.{protocol.__qualname__}", tuple(members), tuple(methods),
                   check=check, instance_of=object)

    def problem(self, entry: Any) -> str | None:
        """What keeps ``entry`` from satisfying the contract (None: nothing)."""
        if self.subclass_of is not None and not (isinstance(entry, type) and issubclass(entry, self.subclass_of)):
            return f"it is not a subclass of {_qualified(self.subclass_of)}"
        if self.instance_of is not None and (isinstance(entry, type) or not isinstance(entry, self.instance_of)):
            what = "a class" if isinstance(entry, type) else f"a {type(entry).__name__}"
            return f"it is {what}, not an instance of {_qualified(self.instance_of)}"
        for member in (*self.members, *self.methods):
            if not hasattr(entry, member):
                return f"it has no member '{member}'"
        for method in self.methods:
            if not callable(getattr(entry, method)):
                return f"its member '{method}' is not callable"
        return self.check(entry) if self.check is not None else None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Registry(Generic[T]):
    """A name → object mapping with lazy entries, globbing, helpful errors and an optional contract.

    ``contract`` (a :class:`Contract`, or ``"module:Attr"`` naming one, imported on first use)
    is what every entry must satisfy.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None, contract: Contract | str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._contract = contract
        self._items: dict[str, T | str] = {}
        self._entry_points_loaded = entry_point_group is None

    @property
    def contract(self) -> Contract | None:
        """The contract entries must satisfy (None: any object)."""
        if isinstance(self._contract, str):
            module, _, attr = self._contract.partition(":")
            self._contract = cast(Contract, getattr(importlib.import_module(module), attr))
        return self._contract

    @overload
    def register(self, name: str, obj: None = None) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

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
        if not isinstance(obj, str):
            self._check(name, obj)
        self._items[name] = obj

    def _check(self, name: str, obj: Any, target: str | None = None) -> None:
        """Refuse ``obj`` under ``name`` unless it satisfies the contract (one line naming what it lacks)."""
        contract = self.contract
        if contract is None or (problem := contract.problem(obj)) is None:
            return
        origin = f" ({target})" if target else ""
        raise RetbenchError(f"{self.kind} '{name}'{origin} does not satisfy the {self.kind} contract "
                            f"{contract.name}: {problem}")

    def _load_entry_points(self) -> None:
        group = self.entry_point_group
        if self._entry_points_loaded or group is None:  # no group: loaded from the start
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=group):
            self._items.setdefault(ep.name, ep.value)

    def get(self, name: str) -> T:
        """Return the entry called ``name`` or raise with suggestions (or, for an entry that does not
        satisfy the contract, with what it lacks)."""
        self._load_entry_points()
        if name not in self._items:
            raise UnknownNameError(self.unknown_message(name))
        item = self._items[name]
        if isinstance(item, str):
            module, _, attr = item.partition(":")
            loaded = getattr(importlib.import_module(module), attr)
            self._check(name, loaded, item)
            self._items[name] = item = loaded
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
