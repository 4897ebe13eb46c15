"""Scoring throughput: meav_merge's scorer (batched queries, shared KV prefix) vs lm-eval's
HF backend on the same model and queries, and the same numbers from both.

Usage: .venv/bin/python bench/score.py [--queries 16]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, ensure_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=16)
    args = ap.parse_args()
    import lm_eval
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.scoring import mean_logprobs, preference_accuracy, prepare

    model_dir = ensure_model()
    recs = load_records(ROOT / "data", "medical", "test")[: args.queries]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    t = time.perf_counter()
    ours = preference_accuracy(mean_logprobs(model, tok, prepare(tok, recs)), recs[0].levels)
    ours_s = time.perf_counter() - t
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    t = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=["meav_pref_medical"], limit=args.queries,
                                  metadata={"tokenizer": str(model_dir)})
    theirs_s = time.perf_counter() - t
    m = res["results"]["meav_pref_medical"]
    print(f"{args.queries} queries x 3 responses")
    print(f"meav scorer:      {ours_s:6.1f} s  ({args.queries / ours_s:.2f} queries/s)  {ours}")
    print(f"lm-eval HF (bs4): {theirs_s:6.1f} s  ({args.queries / theirs_s:.2f} queries/s)  "
          f"exp={m['pref_acc_exp,none']:.3f} gen={m['pref_acc_gen,none']:.3f} avd={m['pref_acc_avd,none']:.3f}")
    print(f"ratio: {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
