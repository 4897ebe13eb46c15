#!/usr/bin/env bash
# Before/after for one domain: the plain medical vector (no retain pairs, no RPO anchor), same data subset,
# moved alone; the other domains are scored exactly as for the retain vectors.
set -euo pipefail
export HF_HUB_OFFLINE=1
M=models/smollm2-135m-instruct; R=runs/multidomain; OUT=docs/results/multidomain
[ -f $R/plain/medical/vector/meav_vector.json ] || .venv/bin/meav train --domain medical --out $R/plain/medical --train-records 124 --force
.venv/bin/meav eval spillover --model $M --lambdas -2,-1,1,2 --limit 32 --move medical \
  --vector medical=$R/plain/medical/vector,financial=$R/retain/financial/vector,legal=$R/retain/legal/vector \
  --title "Spill-over, plain medical vector" --out $OUT/spillover_plain_medical --force
