#!/usr/bin/env bash
# The main job, on the real bundled corpus (../shared/data), in two sizes (`--help` says which is which).
#
# Quick (the default; minutes on 2 cores) shows the whole pipeline on the 4 smallest bundled tasks:
#   1. pretrain one small local foundation model on the bundled images: FLAIR-style image-label-text
#      alignment, CPU preset (every evaluation test image is excluded from pretraining by content);
#   2. benchmark it, the same architecture randomly initialised (--weights random) and the classical
#      baseline on csdi_cataract_severity, mx_dme_cfp_dr, mx_dme_oct_dme and retinamnist with linear probe,
#      few-shot and zero-shot;
#   3. write leaderboards/quick/ with significance tests against both baselines (per-task paired bootstrap,
#      Wilcoxon over the 4 task means, whose smallest attainable p is 0.125);
#   4. check that leaderboards/quick/ is byte-identical to the committed one.
#
# Full (--full; most of an hour on 2 cores) is the study behind the README's tables:
#   1. pretrain two small local foundation models on the bundled images (CPU presets, minutes each):
#      MAE (RETFound's recipe) and FLAIR-style image-label-text alignment; every evaluation test image is
#      excluded from pretraining by content;
#   2. benchmark them, the same architectures randomly initialised (--weights random) and three baselines
#      on every bundled task with linear probe, few-shot and zero-shot; classical and tinyclip on the
#      retrieval and VQA tasks;
#   3. write the leaderboards (markdown, CSV, HTML, figures) with significance tests against the baselines;
#   4. check that leaderboards/ (leaving out leaderboards/quick/) is byte-identical to the committed one.
#
# Each mode has its own pretrained models, result store and leaderboards (quick: runs/quick, results/quick,
# leaderboards/quick; full: runs, results, leaderboards), so neither deletes or drift-checks the other's.
# A drift fails saying which files drifted and why (RETBENCH_ALLOW_DRIFT=1 reports without failing, e.g. after
# changing what is benchmarked): other evaluation, or other pretrained weights (leaderboards/**/
# pretrained_weights.json records their sha256 and the CPU they came from). Pretraining gives the same weights
# on the same CPU model with the same package versions (.ci/constraints.txt; retbench/determinism.py); on
# another CPU model the check passes when every leaderboard row not from the pretrained weights matches the
# committed one within rounding, and says how far the pretrained models' rows moved (benchmarks/drift_check.py).
# Finished pretraining and results are skipped on a rerun (features are cached).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash benchmarks/bundled.sh [--full] [--overwrite] [-- RUN_ARGS...]

The main job on the bundled corpus ($RETBENCH_DATA, default ../shared/data): pretrain, benchmark,
leaderboards with significance tests, then a drift check against the committed leaderboards.

  (default)     quick job, minutes on 2 cores: pretrain a FLAIR-style model; it, its random init and
                the classical baseline on 4 small bundled tasks (linear probe, few-shot, zero-shot)
                -> runs/quick, results/quick, leaderboards/quick/
  --full        the full study, most of an hour on 2 cores: MAE + FLAIR-style models, their random
                inits, classical, timm:resnet18 and tinyclip on every bundled task, retrieval and VQA
                -> runs, results, leaderboards/ (leaderboards/quick/ is left alone)
  --overwrite   recompute results (from cached features) instead of skipping finished ones
  -- RUN_ARGS   passed on to every `retbench run` (e.g. -- --device cuda --batch-size 32)
  -h, --help    show this help and exit

Environment: RETBENCH_DATA, RETBENCH_CACHE (feature cache), RESULTS and RUNS (override the store and the
models' folder), MODELS (--full: the models of the first run), RETBENCH_ALLOW_DRIFT=1 (report drift
without failing).
EOF
}

mode=quick
run_args=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --full) mode=full ;;
    --quick) mode=quick ;;
    --overwrite) run_args+=(--overwrite) ;;
    --) shift; run_args+=("$@"); break ;;
    *) echo "bundled.sh: unknown argument '$1' (retbench run options go after --)" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
bash .ci/setup
export RETBENCH_DATA=${RETBENCH_DATA:-$(cd .. && pwd)/shared/data}
RB=.venv/bin/retbench

# the weights' record (DIR/pretrained_weights.json) and the drift check: benchmarks/drift_check.py
record_weights() { .venv/bin/python benchmarks/drift_check.py record "$1" "$RUNS" "${@:2}"; }
check_drift() { .venv/bin/python benchmarks/drift_check.py check "$@"; }

if [ "$mode" = quick ]; then
  RESULTS=${RESULTS:-results/quick}
  RUNS=${RUNS:-runs/quick}
  TASKS=csdi_cataract_severity,mx_dme_cfp_dr,mx_dme_oct_dme,retinamnist
  [ -f "$RUNS/flair/retbench_model.json" ] || $RB pretrain --recipe flair --data @bundled --out "$RUNS/flair"
  $RB run --model "classical,local:$RUNS/flair" --task "$TASKS" --results-dir "$RESULTS" ${run_args[@]+"${run_args[@]}"}
  $RB run --model "local:$RUNS/flair" --weights random --task "$TASKS" --results-dir "$RESULTS" \
    ${run_args[@]+"${run_args[@]}"}
  rm -rf leaderboards/quick  # generated: nothing but what this store produces
  $RB leaderboard --results-dir "$RESULTS" --out leaderboards/quick --baseline classical --baseline local:flair@random
  $RB results --results-dir "$RESULTS" --csv "$RESULTS/results.csv"
  record_weights leaderboards/quick flair
  check_drift leaderboards/quick
  exit 0
fi

RESULTS=${RESULTS:-results}
RUNS=${RUNS:-runs}
for recipe in mae flair; do
  [ -f "$RUNS/$recipe/retbench_model.json" ] || $RB pretrain --recipe "$recipe" --data @bundled --out "$RUNS/$recipe"
done
$RB run --model "${MODELS:-classical,timm:resnet18,tinyclip,local:$RUNS/mae,local:$RUNS/flair}" --task @bundled \
  --results-dir "$RESULTS" ${run_args[@]+"${run_args[@]}"}
$RB run --model "local:$RUNS/mae,local:$RUNS/flair" --weights random --task @bundled --results-dir "$RESULTS" \
  ${run_args[@]+"${run_args[@]}"}
$RB run --model classical,tinyclip --task @retrieval,@vqa --results-dir "$RESULTS" ${run_args[@]+"${run_args[@]}"}
# generated: nothing but what this store produces (no orphaned tables); the quick job's folder is its own
if [ -d leaderboards ]; then
  find leaderboards -mindepth 1 -maxdepth 1 ! -name quick -exec rm -rf {} +
fi
$RB leaderboard --results-dir "$RESULTS" --out leaderboards \
  --baseline classical --baseline local:mae@random --baseline local:flair@random
$RB results --results-dir "$RESULTS" --csv "$RESULTS/results.csv"
record_weights leaderboards mae flair
check_drift leaderboards --exclude leaderboards/quick
