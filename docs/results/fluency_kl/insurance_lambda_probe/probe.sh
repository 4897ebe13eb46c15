#!/bin/bash
# Insurance samples at one λ point of a composed run: write the recipe, then scripts/recipe_samples.py
# merges it with plain mergekit-yaml and answers the first 3 test queries per domain with `meav judge`
# (distinct-2, base log-prob, judged levels). Every point under one OUT shares one samples.md.
# usage (from the repository root): RP=1.1 OUT=/tmp/probe docs/results/fluency_kl/insurance_lambda_probe/probe.sh runs/composed MED FIN LEGAL
set -euo pipefail
RUN=$1; m=$2; f=$3; l=$4; tag=${RUN##*/}_${m}_${f}_${l}
out=${OUT:-/tmp/insurance_probe}_rp${RP:-1.1}; mkdir -p "$out/recipes"
cat > "$out/recipes/$tag.yaml" <<Y
merge_method: meav
base_model: $RUN/centered
models:
  - model: $RUN/vectors/medical
    parameters: {lambda: $m}
  - model: $RUN/vectors/financial
    parameters: {lambda: $f}
  - model: $RUN/vectors/legal
    parameters: {lambda: $l}
dtype: float32
Y
.venv/bin/python scripts/recipe_samples.py --recipe-file "$out/recipes/$tag.yaml" --domains legal,financial,medical \
  --repetition-penalty "${RP:-1.1}" --out "$out"
