"""glibc's malloc, tuned for CPU extraction and probe solves: large blocks reused from the heap, not mapped anew.

By default glibc serves every allocation above 128 kB (raised dynamically, at most to 32 MB) with its own ``mmap``
and returns it to the kernel on ``free``, so each batch's activations and pixel buffers — a 64-image float batch at
224 px is 38 MB — are page-faulted in afresh, batch after batch. For a model as cheap as ``classical`` those faults
are a large part of the time; the probe solver's per-step temporaries (0.1-1 MB each, tens of thousands per sweep)
meet the same faults. :func:`tune_malloc` raises the mapping and trimming thresholds to 1 GiB once per process, so
freed blocks stay in the heap for the next batch (what jemalloc or tcmalloc, which PyTorch's CPU performance guide
recommends, do by design). The arithmetic is untouched; the cost is that a process keeps up to ~1 GiB of freed
memory instead of returning it. ``RETBENCH_NO_MALLOC_TUNING=1`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import functools
import sys

from retbench.config import env_flag

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30
DISABLE_ENV = "RETBENCH_NO_MALLOC_TUNING"


@functools.cache
def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`THRESHOLD`, once per process; True when they are in effect.

    False (and nothing changed) off Linux, without glibc's ``mallopt``, or when ``$RETBENCH_NO_MALLOC_TUNING`` is
    set (:func:`retbench.config.env_flag`).
    """
    if env_flag(DISABLE_ENV):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
