"""Bitwise-reproducible CPU numerics: the same seed gives the same model on any x86 machine.

Measured on this project's machines (AMD EPYC, torch 2.14, 20 MAE steps): two runs with the same
seed give byte-identical weights, but the same run with ATen's kernels switched from AVX-512 to
AVX2 (``ATEN_CPU_CAPABILITY``), or with 1 thread instead of 2, gives different weights — and after
1,500 steps a different model, i.e. different leaderboards on a machine whose CPU lacks AVX-512.
So retbench pins, before torch loads (set by the ``retbench`` command; a value you set yourself wins):

- ``ATEN_CPU_CAPABILITY=avx2`` — ATen's vectorised kernels use the AVX2 code path on every CPU
  that has it (AVX-512 machines included);
- ``MKL_CBWR=AVX2`` — MKL's conditional numerical reproducibility: the same BLAS code path;
- ``ONEDNN_MAX_CPU_ISA=AVX2`` — the same oneDNN convolution kernels;

and pretraining on CPU fixes the number of threads (``--threads``, default 2) and enables
``torch.use_deterministic_algorithms``. What holds is recorded by :func:`kernel_report`.
"""

from __future__ import annotations

import os
import sys
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


def kernel_report() -> dict[str, Any]:
    """What determines CPU numerics in this process: kernel ISA, threads, pins, deterministic mode."""
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "pinned_env": {k: os.environ.get(k) for k in PINNED},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch": torch.__version__,
    }


def deterministic_training(threads: int) -> dict[str, Any]:
    """Fix threads and deterministic algorithms for a CPU training run; returns :func:`kernel_report`."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return kernel_report()
