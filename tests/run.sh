#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, type-check, then run the whole suite on the bundled data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export RETBENCH_DATA=${RETBENCH_DATA:-$(cd .. && pwd)/shared/data}
export RETBENCH_QUIET=1
.venv/bin/ruff check retbench model_adapters tests benchmarks
.venv/bin/mypy                          # retbench/ and model_adapters/, as [tool.mypy] in pyproject.toml says
# Test files are shared among worker processes (pytest-xdist), whole files per worker so that a file's tests keep
# their order and module fixtures; conftest.py holds each worker to one thread. RETBENCH_TEST_WORKERS=0 runs in
# this process. Default: one worker per core, at most 4 and one per 5 GiB of available memory (each worker holds
# its own models: the largest worker peaked at 4.1 GB, all test processes together at 9.7 GB, with 2 workers).
workers=${RETBENCH_TEST_WORKERS:-$(.venv/bin/python -c "
import os
try:
    kib = next(int(line.split()[1]) for line in open('/proc/meminfo') if line.startswith('MemAvailable:'))
except (OSError, StopIteration):  # not Linux: cores alone
    kib = 4 * 5 * 2**20
cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
print(max(1, min(4, cores, kib // (5 * 2**20))))")}
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
