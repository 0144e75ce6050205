"""Reading spec YAML: ``include:`` resolution and typed access whose errors name the file and dotted key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from retbench.errors import SpecError


def load_yaml_with_includes(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving ``include:`` (a path or list of paths) recursively."""
    path = path.resolve()
    if path in _seen:
        raise SpecError(str(path), "include", "include cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(str(path), "include", "file not found") from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), "<file>", f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                        "save the spec as UTF-8") from None
    except OSError as exc:
        raise SpecError(str(path), "<file>", f"cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise SpecError(str(path), "<yaml>", f"malformed YAML at {where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise SpecError(str(path), "<root>", "a task spec must be a YAML mapping")
    includes = data.pop("include", None)
    includes = [] if includes is None else [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) and i.strip() for i in includes):
        raise SpecError(str(path), "include", f"expected a path or a list of paths, got {type(includes).__name__} "
                        f"{includes!r}")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, load_yaml_with_includes(resolve_include(path, inc), _seen + (path,)))
    return deep_merge(merged, data)


def shipped_tasks_dir() -> Path | None:
    """The ``tasks/`` folder shipped with retbench (inside the wheel, or at the root of a source checkout)."""
    package = Path(__file__).resolve().parents[1]
    return next((d for d in (package / "tasks", package.parent / "tasks") if d.is_dir()), None)


def shipped_bases() -> list[str]:
    """Names of the shipped includes in ``tasks/_base/`` (``classification``, ``flair``...)."""
    shipped = shipped_tasks_dir()
    return sorted(p.stem for p in (shipped / "_base").glob("*.yaml")) if shipped else []


def resolve_include(path: Path, inc: str) -> Path:
    """The file ``include: inc`` of spec ``path`` names: a path relative to the spec, else a shipped base by name
    (``classification``, ``_base/flair``, with or without ``.yaml``), looked up in the shipped tasks folder."""
    target = path.parent / inc
    if target.is_file():
        return target
    shipped, rel = shipped_tasks_dir(), Path(inc if inc.endswith((".yaml", ".yml")) else f"{inc}.yaml")
    if shipped and not rel.is_absolute() and ".." not in rel.parts:
        for candidate in (shipped / "_base" / rel, shipped / rel):
            if candidate.is_file():
                return candidate
    raise SpecError(str(path), "include", f"'{inc}': file not found ({target}) and no shipped base of that name; "
                    f"shipped bases: {', '.join(shipped_bases()) or 'none'}")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into ``base`` recursively (mappings merge, other values from ``over`` win)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Reader:
    """Typed access to a mapping with errors that name the file and dotted key."""

    def __init__(self, file: str, data: dict[str, Any], prefix: str = "") -> None:
        self.file, self.data, self.prefix = file, data, prefix

    def key(self, k: str) -> str:
        """The dotted key of ``k`` under this reader, as errors print it."""
        return f"{self.prefix}{k}"

    def fail(self, k: str, msg: str) -> SpecError:
        """A :class:`SpecError` naming the file and the key ``k``."""
        return SpecError(self.file, self.key(k), msg)

    def get(self, k: str, typ: type | tuple[type, ...], default: Any = ..., choices: tuple = ()) -> Any:
        """``data[k]`` checked against ``typ`` (ints pass as floats) and ``choices``; required without a default."""
        if k not in self.data or self.data[k] is None:
            if default is ...:
                raise self.fail(k, "is required")
            return default
        v = self.data[k]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        accepted = typ if isinstance(typ, tuple) else (typ,)
        if not isinstance(v, typ) or (isinstance(v, bool) and bool not in accepted):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.fail(k, f"expected {names}, got {type(v).__name__} {v!r}")
        if choices and v not in choices:
            raise self.fail(k, f"got {v!r}; allowed: {', '.join(map(str, choices))}")
        return v

    def strings(self, k: str, default: Any = ...) -> tuple[str, ...]:
        """``data[k]`` as a tuple of strings (a single string becomes a one-item tuple)."""
        v = self.get(k, (list, str), default)
        items = [v] if isinstance(v, str) else list(v)
        if not all(isinstance(i, (str, int, float)) and not isinstance(i, bool) for i in items):
            raise self.fail(k, "expected a list of strings (quote yes/no/true/false, which YAML reads as booleans)")
        return tuple(str(i) for i in items)

    def sub(self, k: str, default: Any = ...) -> Reader:
        """A reader for the mapping at ``k`` whose errors carry the dotted prefix."""
        return Reader(self.file, self.get(k, dict, {} if default is ... else default), self.key(k) + ".")

    def check_unknown(self, allowed: set[str]) -> None:
        """Fail on the first key not in ``allowed``, listing what is."""
        for k in self.data:
            if k not in allowed:
                raise self.fail(k, f"unknown key; allowed: {', '.join(sorted(allowed))}")
