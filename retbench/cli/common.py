"""What every ``retbench`` subcommand shares: the consoles, comma-separated option values, and ``--tasks-path``.

Public so that subcommands defined elsewhere (:mod:`retbench.pretrain.cli`, :mod:`retbench.sweep.cli`) use the same
helpers as :mod:`retbench.cli.commands` without reaching into its internals.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console

from retbench.errors import RetbenchError

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)

TASKS_PATH_ENV = "RETBENCH_TASKS_PATH"


def csv_list(values: list[str] | None) -> tuple[str, ...]:
    """Flatten repeated and comma-separated option values."""
    return tuple(v.strip() for item in values or [] for v in item.split(",") if v.strip())


def add_tasks_path_argument(parser: argparse.ArgumentParser) -> None:
    """``--tasks-path DIR``: the command-line form of ``$RETBENCH_TASKS_PATH``."""
    parser.add_argument("--tasks-path", action="append", metavar="DIR",
                        help=f"also read task YAMLs from DIR, as ${TASKS_PATH_ENV} does (repeatable or "
                        f"'{os.pathsep}'-separated; added after ${TASKS_PATH_ENV}'s folders)")


def task_folders(values: Sequence[str] | None) -> list[Path]:
    """The folders named by repeated, ``os.pathsep``-separated ``--tasks-path`` values, made absolute."""
    folders = []
    for value in values or []:
        for part in value.split(os.pathsep):
            if not part:
                continue
            folder = Path(os.path.abspath(os.path.expanduser(part)))
            if not folder.is_dir():
                raise RetbenchError(f"--tasks-path {part}: no such folder")
            folders.append(folder)
    return folders


@contextlib.contextmanager
def extra_task_folders(values: Sequence[str] | None) -> Iterator[None]:
    """``$RETBENCH_TASKS_PATH`` extended by the ``--tasks-path`` folders while a command runs, then restored.

    Going through the variable gives the flag its exact semantics (the same search, the same errors for a task
    defined twice) and carries it to a sweep's job processes, which inherit the environment.
    """
    folders = task_folders(values)
    if not folders:
        yield
        return
    from retbench.tasks import get_task, task_index

    saved = os.environ.get(TASKS_PATH_ENV)
    os.environ[TASKS_PATH_ENV] = os.pathsep.join([p for p in (saved or "").split(os.pathsep) if p]
                                                 + [str(f) for f in folders])
    task_index.cache_clear()
    get_task.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(TASKS_PATH_ENV, None)
        else:
            os.environ[TASKS_PATH_ENV] = saved
        task_index.cache_clear()
        get_task.cache_clear()
