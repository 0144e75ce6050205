#!/usr/bin/env bash
# The main job: benchmark baseline models on every bundled task with the three protocols, then
# write the leaderboards. Finished results are skipped on a rerun (features are cached).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export RETBENCH_DATA=${RETBENCH_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/retbench run --model "${MODELS:-classical,timm:resnet18,tinyclip}" --task @bundled \
  --protocol linear_probe,few_shot,zero_shot --results-dir "${RESULTS:-results}" --leaderboard leaderboards "$@"
.venv/bin/retbench results --results-dir "${RESULTS:-results}" --csv "${RESULTS:-results}/results.csv"
