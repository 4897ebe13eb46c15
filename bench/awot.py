"""Seconds per generated token: plain greedy vs AWOT closed form vs AWOT iterative.

Same prompts, same length (min_new_tokens = max_new_tokens, so every method makes
exactly the same number of tokens), batch size 1 as in the paper's timing, methods
interleaved per prompt so background load hits all three alike.

    .venv/bin/python bench/awot.py [--model DIR] [--prompts 8] [--tokens 48] [--alpha 2.0 --steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    import torch

    from meav_merge.awot import AWOTConfig, AWOTSteering, load_causal_lm, manual_anchors
    from meav_merge.awot.evaluate import format_prompt, generate, read_openings
    from meav_merge.resources import DEFAULT_MODEL_DIR, data_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--anchors", default="sentiment")
    args = p.parse_args(argv)

    model, tok = load_causal_lm(args.model)
    anchors = manual_anchors(args.anchors, tok)
    methods = {
        "greedy": None,
        "awot_closed_form": AWOTSteering(model, anchors, AWOTConfig(args.alpha, args.steps, method="closed_form")),
        "awot_iterative": AWOTSteering(model, anchors, AWOTConfig(args.alpha, args.steps, method="iterative")),
    }
    openings = read_openings(data_dir() / "movie_review_openings.jsonl")[: args.prompts]
    prompts = [format_prompt(tok, op["text"], None, "chat") for op in openings]
    generate(model, tok, prompts[0], 4)  # warm-up, untimed
    names = list(methods)
    wall = {m: [] for m in names}
    cpu = {m: [] for m in names}
    for i, prompt in enumerate(prompts):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate: no method always runs first
            steering = methods[name]
            if steering is not None:
                steering.attach()
            try:
                gen = generate(model, tok, prompt, args.tokens, min_new_tokens=args.tokens)
            finally:
                if steering is not None:
                    steering.detach()
            assert gen.counts[0] == args.tokens, (name, gen.counts)
            wall[name].append(gen.seconds / args.tokens)
            cpu[name].append(gen.cpu_seconds / args.tokens)
    print(f"{args.model}: {args.prompts} prompts x {args.tokens} tokens, batch 1, torch threads "
          f"{torch.get_num_threads()}, alpha={args.alpha}, steps={args.steps}, {len(anchors.positive_ids)}+"
          f"{len(anchors.negative_ids)} anchor tokens, load average {os.getloadavg()[0]:.1f}")
    print(f"{'method':<18} {'wall ms/token':>14} {'x greedy':>9} {'CPU ms/token':>13} {'x greedy':>9}   "
          "(medians over prompts; min wall ms/token)")
    g_wall, g_cpu = statistics.median(wall["greedy"]), statistics.median(cpu["greedy"])
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:<18} {w * 1000:>14.2f} {w / g_wall:>9.3f} {c * 1000:>13.2f} {c / g_cpu:>9.3f}   "
              f"({min(wall[name]) * 1000:.2f})")
    # The hook alone, on one decoding step's state: min over repeats is robust to background load.
    state = torch.randn(1, 1, model.config.hidden_size)
    print("hook alone on one token's state (min of 30 runs):", ", ".join(
        f"{name} {_min_time(lambda s=methods[name]: s.tune(state)) * 1000:.3f} ms" for name in names[1:]))
    return 0


def _min_time(fn, repeats: int = 30) -> float:
    import time

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    sys.exit(main())
