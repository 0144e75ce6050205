"""Task discovery: every ``*.yaml`` under the task folders is a task (``_*`` files are includes).

Task folders: the ``tasks/`` shipped with retbench (inside the wheel, or at the repository
root for a source checkout) plus any folders listed in ``RETBENCH_TASKS_PATH``.
"""

from __future__ import annotations

import fnmatch
import os
from functools import cache, lru_cache
from pathlib import Path

import yaml

from retbench.errors import RetbenchError
from retbench.registry import Registry
from retbench.spec import TaskSpec, parse_spec


def task_dirs() -> list[Path]:
    """Folders scanned for task specs, shipped first."""
    here = Path(__file__).resolve().parent
    dirs = [d for d in (here / "tasks", here.parent / "tasks") if d.is_dir()][:1]
    extra = os.environ.get("RETBENCH_TASKS_PATH", "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


def _spec_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.yaml") if not any(part.startswith("_") for part in p.relative_to(root).parts))


@lru_cache(maxsize=1)
def task_index() -> dict[str, Path]:
    """Task name → spec file (name read from the file, else its stem)."""
    index: dict[str, Path] = {}
    for root in task_dirs():
        for path in _spec_files(root):
            name = _peek_name(path)
            if name in index and index[name] != path:
                raise RetbenchError(f"task '{name}' is defined twice: {index[name]} and {path}")
            index[name] = path
    return index


def _peek_name(path: Path) -> str:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return path.stem  # unreadable: indexed by its stem, and its error names the file when it is used
    return str(data.get("name", path.stem)) if isinstance(data, dict) else path.stem


def task_registry() -> Registry[Path]:
    """A registry view of :func:`task_index` (for suggestions on unknown names)."""
    reg: Registry[Path] = Registry("task")
    for name, path in task_index().items():
        reg.register(name, path)
    return reg


@cache
def get_task(name: str) -> TaskSpec:
    """The validated spec of task ``name`` (or of a YAML file path)."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return parse_spec(Path(name))
    return parse_spec(task_registry().get(name))


def task_specs() -> tuple[dict[str, TaskSpec], list[str]]:
    """Every indexed task's spec, and one message (naming the file) per spec file that fails to parse."""
    specs: dict[str, TaskSpec] = {}
    problems: list[str] = []
    for name in task_index():
        try:
            specs[name] = get_task(name)
        except RetbenchError as exc:
            problems.append(str(exc))
    return specs, problems


def task_groups() -> dict[str, list[str]]:
    """Group name → task names, from each spec's ``groups`` (plus ``all``).

    A spec that fails to parse is in ``all`` only (its groups are unknown); running it reports its error.
    """
    groups: dict[str, list[str]] = {"all": sorted(task_index())}
    specs, _ = task_specs()
    for name in sorted(specs):
        for g in specs[name].groups:
            groups.setdefault(g, []).append(name)
    return groups


def resolve_tasks(selectors: list[str]) -> list[str]:
    """Expand task names, ``@group`` names and globs into a de-duplicated task list."""
    out: list[str] = []
    index = task_index()
    for sel in selectors:
        if sel.startswith("@"):
            groups = task_groups()
            if sel[1:] not in groups:
                raise RetbenchError(f"unknown task group '{sel[1:]}'; groups: {', '.join(sorted(groups))}")
            names = groups[sel[1:]]
        elif any(ch in sel for ch in "*?["):
            names = sorted(n for n in index if fnmatch.fnmatch(n, sel))
            if not names:
                raise RetbenchError(f"no task matches '{sel}'")
        else:
            if not sel.endswith((".yaml", ".yml")):
                task_registry().get(sel)  # raises, with suggestions, for an unknown name
            names = [sel]
        out += [n for n in names if n not in out]
    return out
