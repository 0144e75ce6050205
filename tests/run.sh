#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, type-check, then run the whole suite on the bundled data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export RETBENCH_DATA=${RETBENCH_DATA:-$(cd .. && pwd)/shared/data}
export RETBENCH_QUIET=1
.venv/bin/ruff check retbench model_adapters tests benchmarks
.venv/bin/mypy                          # retbench/ and model_adapters/, as [tool.mypy] in pyproject.toml says
.venv/bin/python -m pytest -q "$@"
