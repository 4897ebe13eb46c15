#!/bin/bash
# Insurance samples at one λ point: merge with plain mergekit-yaml, answer the first 3 test
# queries per domain with `meav judge`, print distinct-2 and the judged levels.
# usage (from the repository root): RP=1.1 OUT=/tmp/probe docs/results/fluency_kl/insurance_lambda_probe/probe.sh runs/composed MED FIN LEGAL
set -euo pipefail
RUN=$1; m=$2; f=$3; l=$4; tag=${RUN##*/}_${m}_${f}_${l}_rp${RP:-1.1}
d=${OUT:-/tmp/insurance_probe}/$tag; mkdir -p "$d"
cat > "$d/recipe.yaml" <<Y
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
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$d/merged"
.venv/bin/mergekit-yaml "$d/recipe.yaml" "$d/merged" >/dev/null 2>&1
for dom in legal financial medical; do
  .venv/bin/meav judge --model "$d/merged" --reference models/smollm2-135m-instruct --domain $dom --n 3 \
    --max-new-tokens 80 --out "$d/$dom" --force --repetition-penalty "${RP:-1.1}" >/dev/null 2>&1
done
rm -rf "$d/merged"
.venv/bin/python - "$d" "$tag" <<P
import json, sys
d, tag = sys.argv[1:]
print(tag, "; ".join(
    f"{dom} distinct-2 {j['fluency']['distinct_2']:.2f} log-prob {j['fluency']['reference_logprob']:.2f} "
    f"E/G/A {j.get('expert', 0):.2f}/{j.get('generic', 0):.2f}/{j.get('avoidance', 0):.2f}"
    for dom in ("legal", "financial", "medical") for j in [json.load(open(f"{d}/{dom}/judged.json"))]))
P
