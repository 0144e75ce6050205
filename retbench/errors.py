"""User-facing errors and warnings: one line, naming the file, row or key at fault."""

from __future__ import annotations


class RetbenchError(Exception):
    """Base class for errors shown to the user as a single line (no traceback)."""


class SpecError(RetbenchError):
    """A task spec is malformed: names the file, the key and what was allowed."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file, self.key = file, key
        super().__init__(f"{file}: key '{key}': {message}")


class DataError(RetbenchError):
    """The data behind a task is missing, unreadable or inconsistent."""


class NotApplicableError(RetbenchError, ValueError):
    """A protocol was asked of a task that does not allow it (a ValueError too, as ``evaluate`` raised before)."""


class UnknownNameError(RetbenchError, KeyError):
    """A name is not in a registry; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def warn(message: str) -> None:
    """One warning line on stderr (the CLI's ``warning:`` lines from library code)."""
    import sys

    print(f"warning: {message}", file=sys.stderr)
