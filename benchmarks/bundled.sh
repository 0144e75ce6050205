#!/usr/bin/env bash
# The main job, on the real bundled corpus (../shared/data):
#   1. pretrain two small local foundation models on the bundled images (CPU presets, minutes each):
#      MAE (RETFound's recipe) and FLAIR-style image-label-text alignment; every evaluation test image is
#      excluded from pretraining by content;
#   2. benchmark them, the same architectures randomly initialised (--weights random) and three baselines
#      on every bundled task with linear probe, few-shot and zero-shot; classical and tinyclip on the
#      retrieval and VQA tasks;
#   3. write the leaderboards (markdown, CSV, HTML, figures) with significance tests against the baselines;
#   4. check that leaderboards/ is byte-identical to the committed one, and fail saying which files drifted
#      (RETBENCH_ALLOW_DRIFT=1 reports without failing, e.g. after changing what is benchmarked).
# Finished pretraining and results are skipped on a rerun (features are cached). The `retbench` command pins
# the CPU kernels (retbench/determinism.py), so pretraining gives the same weights on any x86 CPU with AVX2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export RETBENCH_DATA=${RETBENCH_DATA:-$(cd .. && pwd)/shared/data}
RB=.venv/bin/retbench
RESULTS=${RESULTS:-results}
RUNS=${RUNS:-runs}

for recipe in mae flair; do
  [ -f "$RUNS/$recipe/retbench_model.json" ] || $RB pretrain --recipe "$recipe" --data @bundled --out "$RUNS/$recipe"
done
$RB run --model "${MODELS:-classical,timm:resnet18,tinyclip,local:$RUNS/mae,local:$RUNS/flair}" --task @bundled \
  --results-dir "$RESULTS" "$@"
$RB run --model "local:$RUNS/mae,local:$RUNS/flair" --weights random --task @bundled --results-dir "$RESULTS" "$@"
$RB run --model classical,tinyclip --task @retrieval,@vqa --results-dir "$RESULTS" "$@"
rm -rf leaderboards  # generated: nothing but what this store produces (no orphaned tables)
$RB leaderboard --results-dir "$RESULTS" --out leaderboards \
  --baseline classical --baseline local:mae@random --baseline local:flair@random
$RB results --results-dir "$RESULTS" --csv "$RESULTS/results.csv"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  drift=$(git status --porcelain --untracked-files=all -- leaderboards)
  if [ -n "$drift" ]; then
    echo "leaderboards/ differ from the committed ones:" >&2
    echo "$drift" >&2
    [ -n "${RETBENCH_ALLOW_DRIFT:-}" ] || exit 1
  else
    echo "leaderboards/ are byte-identical to the committed ones"
  fi
fi
