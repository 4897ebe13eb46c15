#!/usr/bin/env bash
# Issue 14: lm_eval through `meav serve` (preset `insurance`, no merge) vs lm_eval --model hf on the merged
# checkpoint of the same recipe, meav_pref_medical, first 32 test queries. Vectors: the retain runs.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
W=runs/serve_lm_eval; OUT=docs/results/serve_lm_eval; mkdir -p $W
M=$(pwd)/models/smollm2-135m-instruct; R=$(pwd)/runs/multidomain/retain
cat > $W/insurance.yaml <<Y
merge_method: meav
base_model: $M
models:
  - {model: $R/medical/vector, parameters: {lambda: -2.0}}
  - {model: $R/financial/vector, parameters: {lambda: 0.0}}
  - {model: $R/legal/vector, parameters: {lambda: 0.0}}
dtype: float32
Y
[ -d $W/merged ] || .venv/bin/mergekit-yaml $W/insurance.yaml $W/merged
[ -s $OUT/hf.txt ] || .venv/bin/lm_eval --model hf --model_args pretrained=$W/merged,dtype=float32 \
  --tasks meav_pref_medical --limit 32 --output_path $W/hf > $OUT/hf.txt 2>&1
# vector names come from --vector; a recipe's vectors all live in folders called "vector"
.venv/bin/meav serve --model $M --vector medical=$R/medical/vector --vector financial=$R/financial/vector \
  --vector legal=$R/legal/vector --recipe insurance=$W/insurance.yaml --port 8765 > $W/serve.log 2>&1 &
PID=$!; trap "kill $PID" EXIT
for i in $(seq 60); do curl -sf http://127.0.0.1:8765/v1/models >/dev/null && break; sleep 2; done
.venv/bin/lm_eval --model local-completions --model_args model=insurance,base_url=http://127.0.0.1:8765/v1/completions,tokenizer=$M,tokenizer_backend=huggingface,max_retries=1 \
  --tasks meav_pref_medical --limit 32 --output_path $W/served > $OUT/served.txt 2>&1
grep -h "pref_acc\|meav_pref_medical" $OUT/hf.txt $OUT/served.txt | head -20
