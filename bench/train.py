"""DPO cost per domain on CPU: the default configuration (frozen trunk cached, dense LM
head) vs plain trl training of the same top layers, side by side in one run.

Prints seconds for set-up (tokenizing + reference log-probs), seconds per DPO step and
the whole domain. The plain-trl run is cut at --plain-steps steps (its set-up still
covers the whole dataset). Usage: .venv/bin/python bench/train.py [--domain medical]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, ensure_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="medical")
    ap.add_argument("--plain-steps", type=int, default=10)
    args = ap.parse_args()
    from meav_merge.training.dpo import MeavTrainConfig, train_vector

    model = ensure_model()
    work = Path(tempfile.mkdtemp(prefix="meav-bench-train-"))
    t = time.perf_counter()
    out = train_vector(model, ROOT / "data", work / "fast", domain=args.domain, config=MeavTrainConfig())
    fast_total = time.perf_counter() - t
    fast = json.loads((out / "train_metrics.json").read_text())["plus"]
    cfg = MeavTrainConfig(frozen_trunk=False, extra={"max_steps": args.plain_steps})
    t = time.perf_counter()
    out = train_vector(model, ROOT / "data", work / "plain", domain=args.domain, config=cfg)
    plain = json.loads((out / "train_metrics.json").read_text())["plus"]
    steps = fast["train_steps"]
    f_step = fast["train_seconds"] / steps
    p_step = plain["train_seconds"] / args.plain_steps
    p_total = plain["setup_seconds"] + p_step * steps
    print(f"domain {args.domain}: {steps} DPO steps (batch 4 pairs, max_length 256, top 4 layers train)")
    print(f"{'':<28}{'set-up s':>9}{'s/step':>8}{'domain s':>10}")
    print(f"{'default (frozen trunk)':<28}{fast['setup_seconds']:9.1f}{f_step:8.2f}{fast_total:10.1f}")
    print(f"{'plain trl, same layers':<28}{plain['setup_seconds']:9.1f}{p_step:8.2f}{p_total:10.1f}  (extrapolated)")
    print(f"ratio: default is {p_total / fast_total:.1f}x faster per domain, {p_step / f_step:.1f}x per step")


if __name__ == "__main__":
    main()
