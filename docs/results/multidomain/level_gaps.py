"""Median per-query gap in token-mean log-prob between levels (nats per token), by domain and λ.

Finer than preference accuracy for comparing training recipes: a vector that moves its own
domain's expert − generic gap by +0.4 per λ and another domain's by +0.25 has a 1.6:1
selectivity, whatever the fractions show. Validation split, first 40 queries per domain.

    .venv/bin/python docs/results/multidomain/level_gaps.py VECTOR [VECTOR ...]   # every vector at the same λ
"""
import sys

import numpy as np

from meav_merge.data.schema import load_records
from meav_merge.evaluation.scoring import prepare
from meav_merge.evaluation.sweep import ReweightableModel
from meav_merge.resources import DEFAULT_MODEL_DIR, data_dir
from meav_merge.vectors.alignment_vector import AlignmentVector

vectors = sys.argv[1:]
rm = ReweightableModel(DEFAULT_MODEL_DIR, [AlignmentVector.load(v) for v in vectors])
print("| domain | λ | expert − generic | generic − avoidance | expert − avoidance |\n|---|---|---|---|---|")
for domain in ("medical", "financial", "legal"):
    records = load_records(data_dir(), domain, "validation")[:40]
    prepared = prepare(rm.tokenizer, records, levels=records[0].levels)
    for lam in [0.0] + ([1.0, 2.0] if vectors else []):
        rm.set([lam] * len(vectors))
        s = np.array(rm.score(prepared))
        gaps = [np.median(s[:, a] - s[:, b]) for a, b in ((0, 1), (1, 2), (0, 2))]
        print(f"| {domain} | {lam:+g} | " + " | ".join(f"{g:+.2f}" for g in gaps) + " |", flush=True)
