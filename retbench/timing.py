"""Where the time goes: named stopwatch sections summed into the innermost open collection.

A collection (:func:`collect`) is a dict of seconds by section name; :func:`timed` adds the
time of its block to the innermost open collection (nothing when none is open, so library
code can mark its sections unconditionally), and :func:`timed_calls` wraps a callable the
same way. The runner opens one collection per protocol run and stores it with the result's
timings; ``retbench run --profile`` prints them per model (:func:`profile_table`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_OPEN: list[dict[str, float]] = []

PROFILE_COLUMNS = (
    ("decode_s", "decode + preprocess"),
    ("forward_s", "forward"),
    ("probe_fit_s", "probe fits"),
    ("bootstrap_s", "summary + bootstrap"),
    ("write_s", "writing"),
)
"""The sections ``--profile`` reports, in pipeline order: (timings key, column header)."""


@contextmanager
def collect() -> Iterator[dict[str, float]]:
    """Open a collection; the dict it yields holds the seconds of the sections timed inside."""
    sections: dict[str, float] = {}
    _OPEN.append(sections)
    try:
        yield sections
    finally:
        _OPEN.remove(sections)


@contextmanager
def timed(name: str) -> Iterator[None]:
    """Add the block's wall time to section ``name`` of the innermost open collection."""
    if not _OPEN:
        yield
        return
    sections = _OPEN[-1]
    start = time.perf_counter()
    try:
        yield
    finally:
        sections[name] = sections.get(name, 0.0) + time.perf_counter() - start


def timed_calls(fn: F, name: str) -> F:
    """``fn`` with each call timed as section ``name``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with timed(name):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def profile_rows(timings: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    """Rows (model, section seconds …, other, total) summed per model from (model, result timings) pairs."""
    per_model: dict[str, dict[str, float]] = {}
    for model, t in timings:
        row = per_model.setdefault(model, {})
        for key, _ in PROFILE_COLUMNS:
            row[key] = row.get(key, 0.0) + float(t.get(key, 0.0))
        row["total_s"] = row.get("total_s", 0.0) + float(t.get("total_s", 0.0))
        row["results"] = row.get("results", 0) + 1
    rows = []
    for model, row in per_model.items():
        sections = [row[key] for key, _ in PROFILE_COLUMNS]
        other = max(row["total_s"] - sum(sections), 0.0)
        rows.append([model, int(row["results"]), *sections, other, row["total_s"]])
    return rows


def profile_table(timings: list[tuple[str, dict[str, Any]]]) -> str:
    """The per-model table ``retbench run --profile`` prints (seconds; share of the total in brackets)."""
    from tabulate import tabulate

    headers = ["model", "results", *(label for _, label in PROFILE_COLUMNS), "other", "total"]
    body = []
    for row in profile_rows(timings):
        total = row[-1] or 1.0
        body.append([*row[:2], *(f"{v:.2f} ({100 * v / total:.0f}%)" for v in row[2:-1]), f"{row[-1]:.2f}"])
    return tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True)
