#!/usr/bin/env bash
# Multi-domain experiment (issue 13): vectors with and without retain pairs + RPO anchor,
# their spill-over on the test split, and the all-27 search fitted on validation, reported on test.
# Run from the repository root: bash docs/results/multidomain/run.sh
set -euo pipefail
export HF_HUB_OFFLINE=1
M=models/smollm2-135m-instruct
R=runs/multidomain
OUT=docs/results/multidomain
N=${TRAIN_RECORDS:-124}          # train records per domain (time-bounded; the split holds ~175)
LIMIT=${LIMIT:-32}               # test queries per domain for the reports
FIT_LIMIT=${FIT_LIMIT:-12}       # validation queries per domain for fitting
BUDGET=${BUDGET:-60}
.venv/bin/meav base --out $M >/dev/null 2>&1 || true
train() {  # variant domain extra-args...
  local v=$1 d=$2; shift 2
  [ -f $R/$v/$d/vector/meav_vector.json ] || .venv/bin/meav train --domain $d --out $R/$v/$d --train-records $N "$@" --force
}
for d in medical financial legal; do train retain $d --retain-records 20 --sft-weight 1.0; done
for d in medical financial legal; do train plain $d; done
for v in plain retain; do
  [ -f $OUT/spillover_$v/spillover.json ] || .venv/bin/meav eval spillover --model $M --lambdas -2,-1,1,2 --limit $LIMIT \
    --vector medical=$R/$v/medical/vector,financial=$R/$v/financial/vector,legal=$R/$v/legal/vector \
    --title "Spill-over, $v vectors" --out $OUT/spillover_$v --force
done
V=${VARIANT:-retain}
.venv/bin/meav search --model $M --all --strategy ${STRATEGY:-surrogate} --budget $BUDGET --limit $FIT_LIMIT \
  --report-limit $LIMIT --vector medical=$R/$V/medical/vector,financial=$R/$V/financial/vector,legal=$R/$V/legal/vector \
  --out $OUT/search_${V}_${STRATEGY:-surrogate} --force
