"""Atomic file writes: write to a temporary file in the same folder, fsync, rename.

Files get the permissions any other program's would under the user's umask (``0o666 & ~umask``: 0644 under
umask 022), not the 0600 of the temporary file ``tempfile.mkstemp`` creates.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from retbench.errors import RetbenchError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (Linux: ``/proc/self/status``),
    else by setting and restoring it under a lock (set to 077 meanwhile: a file another thread creates in that
    instant is private, never world-writable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half of one.

    ``fsync=False`` skips flushing the data to the disk before the rename (a few ms per file): for caches whose
    entries carry their own checksum, where a file left short by a power cut is detected and rebuilt.

    The file's mode is ``0o666 & ~umask``, as ``open()`` would have made it, set before the rename.
    A write that fails (a full disk, a quota, a folder turned read-only) removes its temporary file,
    leaves ``path`` as it was and raises one :class:`RetbenchError` line naming ``path``.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RetbenchError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RetbenchError(f"cannot write {path}: {exc.strerror or exc}; nothing was half-written "
                                "(free space or choose another folder, then rerun: finished work is kept)") from None
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted, strict JSON: NaN and ±infinity become ``null``.

    Python's ``json`` would write the literals ``NaN``/``Infinity``, which strict parsers (browsers,
    ``jq``, most languages) reject; readers treat ``null`` as a missing value.
    """
    atomic_write_bytes(path, (dumps_strict(obj) + "\n").encode())


def dumps_strict(obj: Any) -> str:
    """``obj`` as indented, key-sorted JSON without NaN/Infinity literals (each written as ``null``)."""
    try:
        return json.dumps(obj, indent=1, sort_keys=True, default=_default, allow_nan=False)
    except ValueError:  # a non-finite number somewhere: replace them all (the common case pays nothing)
        return json.dumps(_finite(obj), indent=1, sort_keys=True, allow_nan=False)


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (numpy values and arrays converted first)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return _finite(_default(obj))


def _default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
