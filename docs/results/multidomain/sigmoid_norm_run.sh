#!/usr/bin/env bash
# Issue 13 with length-normalized sigmoid DPO (trl loss "sigmoid_norm", β=5) + 60 zero-margin
# retain records per other domain: train the three proficiency vectors,
# their spill-over matrix on test, and the all-27 search fitted on validation, reported on test.
# Run from the repository root: bash docs/results/multidomain/sigmoid_norm_run.sh
set -euo pipefail
export HF_HUB_OFFLINE=1
M=models/smollm2-135m-instruct
R=${RUNS:-runs/sigmoid_norm}
OUT=${OUT:-docs/results/multidomain/search_sigmoid_norm_${STRATEGY:-surrogate}}
EXTRA=${EXTRA:-}
SPILL=${SPILL:-docs/results/multidomain/spillover_sigmoid_norm}
REPORT_LIMIT=${REPORT_LIMIT:-32}   # test queries per domain in the report
for d in medical financial legal; do
  [ -f $R/$d/vector/meav_vector.json ] || .venv/bin/meav train --domain $d --out $R/$d --train-records 124 \
    --retain-records 60 --loss-type sigmoid_norm --beta 5 $EXTRA --force
done
[ -f $SPILL/spillover.json ] || .venv/bin/meav eval spillover --model $M --lambdas -2,-1,1,2 \
  --limit 32 --vector medical=$R/medical/vector,financial=$R/financial/vector,legal=$R/legal/vector \
  --title "Spill-over, sigmoid_norm + retain 60 vectors" --out $SPILL --force
.venv/bin/meav search --model $M --all --strategy ${STRATEGY:-surrogate} --budget ${BUDGET:-40} --limit ${FIT_LIMIT:-16} --report-limit $REPORT_LIMIT \
  --vector medical=$R/medical/vector,financial=$R/financial/vector,legal=$R/legal/vector --out $OUT --force
