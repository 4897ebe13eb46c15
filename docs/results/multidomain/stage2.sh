#!/usr/bin/env bash
# After the retain vectors exist: their spill-over, the all-27 search on them, then the plain
# (no retain, no anchor) vectors and their spill-over for the before/after comparison.
set -euo pipefail
export HF_HUB_OFFLINE=1
M=models/smollm2-135m-instruct; R=runs/multidomain; OUT=docs/results/multidomain
LIMIT=${LIMIT:-32}; FIT_LIMIT=${FIT_LIMIT:-12}; BUDGET=${BUDGET:-40}
vecs() { echo medical=$R/$1/medical/vector,financial=$R/$1/financial/vector,legal=$R/$1/legal/vector; }
spill() {
  [ -f $OUT/spillover_$1/spillover.json ] || .venv/bin/meav eval spillover --model $M --lambdas -2,-1,1,2 \
    --limit $LIMIT --vector $(vecs $1) --title "Spill-over, $1 vectors" --out $OUT/spillover_$1 --force
}
spill retain
[ -f $OUT/search_retain_surrogate/search_report.json ] || .venv/bin/meav search --model $M --all --strategy surrogate \
  --budget $BUDGET --limit $FIT_LIMIT --report-limit $LIMIT --vector $(vecs retain) \
  --out $OUT/search_retain_surrogate --force
# issue 14: compressed vectors' fidelity on the test split, and mergekit-extract-lora on one domain
[ -f runs/bench/compress_all/compress_report.json ] || .venv/bin/python bench/compress.py --ranks 64 --limit $LIMIT \
  --run medical=$R/retain/medical --run financial=$R/retain/financial --run legal=$R/retain/legal \
  --no-mergekit --work runs/bench/compress_all || echo "compress bench failed"
[ -f runs/bench/compress_mk/compress_report.json ] || .venv/bin/python bench/compress.py --ranks 64 --limit $LIMIT \
  --run medical=$R/retain/medical --work runs/bench/compress_mk || echo "compress bench (mergekit) failed"
for d in medical financial legal; do
  [ -f $R/plain/$d/vector/meav_vector.json ] || .venv/bin/meav train --domain $d --out $R/plain/$d --train-records 124 --force
done
spill plain
