"""Bitwise-reproducible CPU numerics: the same seed, the same model, on the same kind of machine.

Measured on this project's machines (torch 2.14, 20 MAE steps): two runs with the same seed give
byte-identical weights, but the same run with ATen's kernels switched from AVX-512 to AVX2
(``ATEN_CPU_CAPABILITY``), or with 1 thread instead of 2, gives different weights — and after
1,500 steps a different model, i.e. different leaderboards. So retbench pins, before torch loads
(set by the ``retbench`` command; a value you set yourself wins):

- ``ATEN_CPU_CAPABILITY=avx2`` — ATen's vectorised kernels use the AVX2 code path on every CPU
  that has it (AVX-512 machines included);
- ``MKL_CBWR=AVX2`` — MKL's conditional numerical reproducibility: the same BLAS code path;
- ``ONEDNN_MAX_CPU_ISA=AVX2`` — the same oneDNN convolution kernels;

and pretraining on CPU fixes the number of threads (``--threads``, default 2) and enables
``torch.use_deterministic_algorithms``. What holds is recorded by :func:`kernel_report`.

What is established (docs/pretraining.md, "Determinism"): the same weights from two sessions on the same
CPU model (an Intel Xeon) with the same package versions. What does not hold: the same weights across CPU
vendors — on an AMD EPYC the same command gave other weights, and MKL there reports the ``AUTO`` branch for
``MKL_CBWR=AVX2`` (it honours only ``COMPATIBLE`` on non-Intel CPUs), so its GEMMs follow the CPU. The report
therefore records the CPU (vendor, model, ISA flags), the MKL branch that really ran (:func:`mkl_branch`) and
the package versions, so a drift can be traced to one of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""Environment variables that pin CPU kernel selection; read by torch/MKL/oneDNN when they load."""

DEFAULT_THREADS = 2
"""CPU threads of reproducible pretraining (results differ bitwise between thread counts)."""


def pin_cpu_kernels() -> bool:
    """Set :data:`PINNED` defaults; True when they take effect (torch not imported yet in this process)."""
    for key, value in PINNED.items():
        os.environ.setdefault(key, value)
    return "torch" not in sys.modules


ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16")
"""CPU flags (``/proc/cpuinfo`` names) that decide which kernels a library may take."""


def cpu_description() -> dict[str, Any]:
    """The CPU's vendor, model name and ISA flags (:data:`ISA_FLAGS` present), from ``/proc/cpuinfo`` where it
    exists; ``platform`` otherwise (flags then unknown)."""
    import platform

    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if not sep:
                    if info:
                        break  # the first processor's block is enough
                    continue
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return {
        "vendor": info.get("vendor_id", "unknown"),
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "isa_flags": [f for f in ISA_FLAGS if f in flags] if flags else "unknown",
    }


def cpu_label(cpu: dict[str, Any]) -> str:
    """A :func:`cpu_description` on one line: ``vendor model (flags)`` (what model cards and the main job's weights
    record show, and what the drift check compares)."""
    flags = cpu.get("isa_flags", "unknown")
    flags = flags if isinstance(flags, str) else " ".join(flags)
    return f"{cpu.get('vendor', 'unknown')} {cpu.get('model', 'unknown')} ({flags})"


MKL_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
                10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
"""MKL's conditional-numerical-reproducibility branch codes (``mkl_cbwr_get(MKL_CBWR_BRANCH)``) by name."""


def mkl_branch() -> str:
    """The MKL code branch in effect in this process (``AVX2`` when the pin held), or ``unknown``.

    MKL may override ``MKL_CBWR``: on an AMD EPYC it reports ``AUTO`` for ``MKL_CBWR=AVX2`` (honouring only
    ``COMPATIBLE``), so its GEMMs take whatever path MKL picks for that CPU. Read from the MKL linked into torch
    (its service symbol ``mkl_serv_cbwr_get``; ``unknown`` where torch has no MKL or does not export it).
    """
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return "unknown"
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return "unknown"
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    code = get(1)  # MKL_CBWR_BRANCH
    return MKL_BRANCHES.get(code, f"code {code}")


def kernel_report() -> dict[str, Any]:
    """What determines CPU numerics in this process: the CPU, kernel ISA, threads, pins, deterministic mode and
    the versions of the numerical packages."""
    import torch

    from retbench.environment import package_versions

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "pinned_env": {k: os.environ.get(k) for k in PINNED},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__,
        "cpu": cpu_description(),
        "mkl": torch.backends.mkl.is_available(),
        "mkl_branch": mkl_branch(),
        "packages": package_versions(),
    }


@contextmanager
def deterministic_training(threads: int) -> Iterator[dict[str, Any]]:
    """Fix threads and deterministic algorithms for a CPU training run, yielding :func:`kernel_report`.

    Both are process-wide torch settings, so they are restored on exit: a notebook or script that pretrains and then
    evaluates in the same process gets its own thread count and deterministic mode back.
    """
    import torch

    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield kernel_report()
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])
