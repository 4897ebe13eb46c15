#!/usr/bin/env bash
# Issue 13 with composed training (`meav train-composed`): the three proficiency vectors and a
# centered model learned together, λ in {-1, 0, +1} per domain at every step. Then the paper's
# grid over the same λ (27 points) fitted on validation and reported on the whole test split,
# and the Table-2 spill-over matrix on test.
# Run from the repository root: bash docs/results/multidomain/composed/run.sh
set -euo pipefail
export HF_HUB_OFFLINE=1
R=${RUNS:-runs/composed}
HERE=docs/results/multidomain/composed
V=medical=$R/vectors/medical,financial=$R/vectors/financial,legal=$R/vectors/legal
[ -f $R/train_metrics.json ] || .venv/bin/meav train-composed --domains medical,financial,legal --out $R \
  --steps ${STEPS:-700} --lr ${LR:-2e-4}
cp $R/train_metrics.json $HERE/train_metrics.json
.venv/bin/meav search --model $R/centered --all --strategy grid --grid-step 1 --low -1 --high 1 --limit ${FIT_LIMIT:-20} \
  --vector $V --out $HERE/search_grid --force
.venv/bin/meav eval spillover --model $R/centered --lambdas -1,1 --limit ${SPILL_LIMIT:-48} --vector $V \
  --title "Spill-over, composed vectors (relative to the centered model)" --out $HERE/spillover --force
# "before": the per-domain DPO vectors' matrices are in ../spillover_plain_medical and ../spillover_retain
# (same command, same λ, n = 32 per domain on test).
