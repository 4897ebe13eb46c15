"""Scoring throughput: meav_merge's scorer (batched queries, shared KV prefix) vs lm-eval's
HF backend on the same model and queries, and the same numbers from both.

Usage: .venv/bin/python bench/score.py [--queries 16] [--repeats 2]
"""

import argparse
import sys
import time
from statistics import median
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, ensure_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
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
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")

    def ours():
        return preference_accuracy(mean_logprobs(model, tok, prepare(tok, recs), progress=False), recs[0].levels)

    def theirs():
        res = lm_eval.simple_evaluate(model=lm, tasks=["meav_pref_medical"], limit=args.queries,
                                      metadata={"tokenizer": str(model_dir)})["results"]["meav_pref_medical"]
        short = {"expert": "exp", "generic": "gen", "avoidance": "avd"}
        return {lv: res[f"pref_acc_{short[lv]},none"] for lv in recs[0].levels}

    times = {"meav": [], "lm-eval": []}
    fractions = {}
    # alternating which goes first, so neither always runs on a freshly started process or right after the other
    for i in range(args.repeats):
        order = (("meav", ours), ("lm-eval", theirs))
        for name, run in order if i % 2 == 0 else reversed(order):
            t = time.perf_counter()
            fractions[name] = run()
            times[name].append(time.perf_counter() - t)
    ours_s, theirs_s = median(times["meav"]), median(times["lm-eval"])
    print(f"{args.queries} queries x 3 responses, {args.repeats} repeats (medians)")
    print(f"meav scorer:      {ours_s:6.1f} s  ({args.queries / ours_s:.2f} queries/s)  {fractions['meav']}")
    print(f"lm-eval HF (bs4): {theirs_s:6.1f} s  ({args.queries / theirs_s:.2f} queries/s)  {fractions['lm-eval']}")
    if any(abs(fractions["meav"][lv] - fractions["lm-eval"][lv]) > 1e-9 for lv in recs[0].levels):
        sys.exit("the two scorers disagree on the fractions")
    print("per repeat: " + " ".join(f"{t / o:.2f}x" for o, t in zip(times["meav"], times["lm-eval"])))
    print(f"ratio: {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
