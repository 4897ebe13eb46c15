"""DPO cost per domain on CPU: the default configuration (frozen trunk cached, dense LM
head) vs plain trl training of the same top layers, side by side in one run.

Prints seconds for set-up (tokenizing + reference log-probs), seconds per DPO step and
the whole domain, and first a FLOP floor: the least time exact DPO of the CPU preset's top layers on
--floor-records records could take at this machine's measured matmul rate (``--floor-only``
prints just that, in under a minute). The plain-trl run is cut at --plain-steps steps (its set-up still
covers the whole dataset). Usage: .venv/bin/python bench/train.py [--domain medical]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, ensure_model, scratch  # noqa: E402


def _mm_rate(m: int, k: int, n: int, repeats: int = 20) -> float:
    """This machine's best float32 GFLOP/s for an (m×k)·(k×n) matmul (best of many: the rate moves
    with other load on these machines, and a floor wants the fastest)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def flop_floor(model_dir: Path, domain: str, records: int) -> dict:
    """A lower bound on one domain's DPO time on this machine: the matmul FLOPs that exact
    top-k DPO cannot skip, at the best matmul rate measured here. Counted as if every
    context and every distinct response ran once through the frozen trunk, once through the top
    layers for the reference and once per epoch forward + backward, the LM head on response positions only
    (forward + the gradient to its input), attention scores ignored: a floor, not a model
    of any implementation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meav_merge.data.schema import load_records
    from meav_merge.training.composed import _queries
    from meav_merge.training.dpo import MeavTrainConfig

    preset = MeavTrainConfig()  # the default CPU preset: which layers train, where rows are cut
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    n_layers, head = model.config.num_hidden_layers, model.lm_head.weight.numel()
    hidden = model.config.hidden_size
    queries = _queries(tok, load_records(ROOT / "data", domain, "train"), preset.max_length)
    ctx = sum(len(q.context) for q in queries) / len(queries)
    resp = sum(len(r) - s for q in queries for r, s in zip(q.rows, q.starts)) / len(queries)
    k = preset.trainable_layers
    flops = {  # per record
        "trunk": 2 * layer * (n_layers - k) * (ctx + resp),
        # forward for the reference, forward + backward (weights and inputs) per epoch; the lowest
        # trained layer needs no gradient for its input
        "top layers (reference + train)": ((2 + 6) * k - 2) * layer * (ctx + resp),
        "LM head (reference + train)": (2 + 4) * head * resp,
    }
    rate_layer = _mm_rate(2048, hidden, model.config.intermediate_size)
    rate_head = _mm_rate(1024, hidden, model.lm_head.weight.shape[0])
    seconds = {n: f * records / 1e9 / (rate_head if n.startswith("LM") else rate_layer) for n, f in flops.items()}
    return {"records": records, "trainable_layers": k, "tokens_per_record": {"context": round(ctx, 1), "responses": round(resp, 1)},
            "gflop_per_s": {"layer": round(rate_layer, 1), "lm_head": round(rate_head, 1)},
            "seconds": {n: round(s, 1) for n, s in seconds.items()}, "floor_seconds": round(sum(seconds.values()), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="medical")
    ap.add_argument("--plain-steps", type=int, default=10)
    ap.add_argument("--floor-records", type=int, default=400, help="records per domain for the FLOP floor (issue 18's goal: 400)")
    ap.add_argument("--floor-only", action="store_true", help="print the FLOP floor and skip the two trainings")
    args = ap.parse_args()
    model = ensure_model()
    floor = flop_floor(model, args.domain, args.floor_records)
    print(f"FLOP floor, {args.domain}, {floor['records']} records, 1 epoch, top {floor['trainable_layers']} layers: "
          f"{floor['floor_seconds']:.0f} s "
          f"at the measured {floor['gflop_per_s']} GFLOP/s; {json.dumps(floor['seconds'])}; "
          f"tokens per record {floor['tokens_per_record']}")
    if args.floor_only:
        return
    from meav_merge.training.dpo import MeavTrainConfig, train_vector

    work = scratch("meav-bench-train-")
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
