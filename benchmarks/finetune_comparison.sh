#!/usr/bin/env bash
# Fine-tuning vs linear probe on small bundled tasks (issue 18), cpu preset: timm:vit_tiny_patch16_224 (random
# init) and the MAE model the study pretrains (local:$RUNS/mae), each with finetune and linear_probe; then the
# paired comparison table (benchmarks/finetune_comparison.py). Resumable: rerun after a kill; finished results
# are skipped and an interrupted fine-tuning resumes from its last epoch.
#
#   bash benchmarks/finetune_comparison.sh            # RESULTS=results-finetune RUNS=runs
set -euo pipefail
cd "$(dirname "$0")/.."
RB=${RB:-.venv/bin/retbench}
RESULTS=${RESULTS:-results-finetune}
RUNS=${RUNS:-runs}
TASKS=${TASKS:-mx_dme_cfp_dr,mx_dme_oct_dme,csdi_cataract_severity}
[ -f "$RUNS/mae/retbench_model.json" ] || $RB pretrain --recipe mae --data @bundled --out "$RUNS/mae"
start=$(date +%s)
$RB run --model "local:$RUNS/mae,timm:vit_tiny_patch16_224" --task "$TASKS" -p finetune,linear_probe \
  --device cpu --results-dir "$RESULTS"
echo "run: $(( $(date +%s) - start )) s"
.venv/bin/python benchmarks/finetune_comparison.py "$RESULTS" --tasks "$TASKS" \
  --models "local:mae,timm:vit_tiny_patch16_224"
.venv/bin/python benchmarks/finetune_comparison.py "$RESULTS" --tasks "$TASKS" \
  --models "local:mae,timm:vit_tiny_patch16_224" --metric auroc
