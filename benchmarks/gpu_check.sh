#!/usr/bin/env bash
# The prepared device check (issue 16): GPU-marked tests, extraction vs bare bf16 forward (ViT-B/16, ViT-L/16),
# probe solver CUDA vs CPU, MAE --preset gpu for ~4 minutes then its linear probe vs random init.
# One line per figure; about 8 minutes on one GPU. Figures also go to $OUT/gpu_check.json when $OUT is set.
#
#   bash benchmarks/gpu_check.sh             # on a machine with CUDA
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere: every part on the CPU at toy sizes (tested)
#
# Python: .venv/bin/python when this checkout has one (bash .ci/setup), else $PYTHON, else python3 with
# retbench's dependencies installed; retbench runs from this checkout (PYTHONPATH), no install needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RETBENCH_DATA=${RETBENCH_DATA:-$(cd .. && pwd)/shared/data}
json=()
if [ -n "${OUT:-}" ]; then json=(--json "$OUT/gpu_check.json"); fi
exec "$PY" benchmarks/gpu_check.py "${json[@]}" "$@"
