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
# this process. Default: one worker per core, at most 4 (each worker holds its own models in memory).
cores=$(.venv/bin/python -c "import os; print(len(os.sched_getaffinity(0)))")
workers=${RETBENCH_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
