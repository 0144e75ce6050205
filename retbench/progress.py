"""Progress for long work: a rich bar on a terminal, plain lines in logs (silenced by ``RETBENCH_QUIET=1``).

When stderr is neither a terminal nor a notebook (a redirected log, a Slurm or submitit job), a live
bar cannot redraw, so each bar prints a line when it passes a tenth of its work, at most every
``LOG_EVERY_S`` seconds, and one when it ends::

    pretrain mae: 300/3000 (10%), 03:15 elapsed, ~29:15 left, loss 0.2113
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)

LOG_EVERY_S = 5.0
"""Least seconds between two plain progress lines (the closing line always prints)."""

Advance = Callable[..., None]
"""``advance(n=1, status=None)``: record ``n`` more units done; ``status`` is a short text shown with the bar."""


def quiet() -> bool:
    """True when progress output is switched off."""
    return os.environ.get("RETBENCH_QUIET", "") not in ("", "0")


@contextmanager
def progress_bar(description: str, total: int, out: Console | None = None) -> Iterator[Advance]:
    """Yield an ``advance(n=1, status=None)`` callable driving one progress display on ``out`` (stderr)."""
    out = out or console
    if quiet():
        yield lambda n=1, status=None: None
    elif out.is_terminal or out.is_jupyter:  # rich redraws in place there (a notebook gets a widget)
        with _rich_bar(description, total, out) as advance:
            yield advance
    else:
        yield _LogLines(description, total, out).advance


@contextmanager
def _rich_bar(description: str, total: int, out: Console) -> Iterator[Advance]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=out, transient=False) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            fields: dict[str, Any] = {"status": status} if status is not None else {}
            bar.update(task, advance=n, **fields)

        yield advance


class _LogLines:
    """Plain lines for non-terminal output: at tenths of the work (``LOG_EVERY_S`` apart) and at the end."""

    def __init__(self, description: str, total: int, out: Console, parts: int = 10) -> None:
        self.description, self.total, self.out, self.parts = description, max(0, total), out, parts
        self.done, self.printed, self.start = 0, 0, time.perf_counter()
        self.last = self.start

    def advance(self, n: int = 1, status: str | None = None) -> None:
        """Count ``n`` units; print when a new tenth is reached (not too soon after the last line) or at the end."""
        self.done += n
        end = self.done >= self.total
        part = self.parts if end else self.done * self.parts // max(1, self.total)
        now = time.perf_counter()
        if part > self.printed and (end or now - self.last >= LOG_EVERY_S):
            self.printed, self.last = part, now
            self.out.print(self.line(status), highlight=False, markup=False)

    def line(self, status: str | None) -> str:
        """``description: done/total (pct), elapsed, ~left[, status]``."""
        elapsed = time.perf_counter() - self.start
        pct = 100 * self.done / self.total if self.total else 100.0
        parts = [f"{self.description}: {self.done}/{self.total} ({pct:.0f}%)", f"{_clock(elapsed)} elapsed"]
        if 0 < self.done < self.total:
            parts.append(f"~{_clock(elapsed * (self.total - self.done) / self.done)} left")
        if status:
            parts.append(status)
        return ", ".join(parts)


def _clock(seconds: float) -> str:
    """``H:MM:SS`` without the hour when under an hour."""
    text = str(timedelta(seconds=round(seconds)))
    return text[2:] if text.startswith("0:") else text
