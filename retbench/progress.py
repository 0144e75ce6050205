"""Rich progress bars for long work (silenced by ``RETBENCH_QUIET=1``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


def quiet() -> bool:
    """True when progress output is switched off."""
    return os.environ.get("RETBENCH_QUIET", "") not in ("", "0")


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[callable]:
    """Yield an ``advance(n)`` callable driving one progress bar."""
    if quiet():
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
