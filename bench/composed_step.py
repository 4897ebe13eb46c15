"""Composed training (``meav train-composed``) per step: today's step against the round-1 step,
side by side in one run on the same batches.

- today: each query's context runs through the trained top layers once and its three
  responses continue from the repeated KV cache; fused AdamW.
- round 1 (kept here as the reference): three padded rows per query that each repeat the
  context; AdamW's per-tensor loop, the CPU default.

Both start from the same zero vectors and take the same steps, so the check that the
speed-up changes no result is direct: the losses of every step and the vectors after the
last step must agree within float tolerance. Prints seconds per step and the ratio.
Usage: .venv/bin/python bench/composed_step.py [--steps 12] [--queries 12]
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, ensure_model  # noqa: E402


def padded_level_logprobs(head, params, queries):
    """Round 1's ``level_logprobs``: every level a padded row of context + response."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    rows = [r for q in queries for r in q.rows]
    starts = [s for q in queries for s in q.starts]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    hidden = functional_call(head.model, params, (), {"input_ids": ids, "attention_mask": mask,
                                                      "use_cache": False}).last_hidden_state
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, s) in enumerate(zip(rows, starts)):
        scored[i, s: len(r)] = True
    pred = scored[:, 1:]
    logits = head.lm_head(hidden[:, :-1][pred]).float()
    picked = F.log_softmax(logits, dim=-1).gather(1, ids[:, 1:][pred][:, None])[:, 0]
    per_row = torch.zeros(len(rows)).index_add(0, pred.nonzero()[:, 0], picked)
    return (per_row / pred.sum(1).clamp(min=1)).view(len(queries), 3)


def run(head, batches, level_logprobs, fused: bool):
    """(seconds per step, losses, final vectors) of the composed loop on fixed batches."""
    import torch

    from meav_merge.training.composed import _weights, composed_loss

    base = {n: p.detach() for n, p in head.model.named_parameters() if n.startswith("layers.") or n == "norm.weight"}
    center = {n: torch.nn.Parameter(torch.zeros_like(w)) for n, w in base.items()}
    vectors = {d: {n: torch.nn.Parameter(torch.zeros_like(w)) for n, w in base.items()} for d in range(3)}
    params = list(center.values()) + [p for v in vectors.values() for p in v.values()]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, **({"fused": True} if fused else {}))
    losses, started = [], time.perf_counter()
    for lam, batch, targets in batches:
        means = level_logprobs(head, _weights(base, center, vectors, lam), batch)
        loss, _ = composed_loss(means, targets, 10.0, 0.2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return (time.perf_counter() - started) / len(batches), losses, torch.cat([p.detach().flatten() for p in params])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--queries", type=int, default=12, help="train queries per domain to draw from")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meav_merge.data.schema import load_records
    from meav_merge.training.composed import _queries, level_logprobs
    from meav_merge.training.trunk import split_model

    model_dir = ensure_model()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pools = [_queries(tok, sorted(load_records(ROOT / "data", d, "train"), key=lambda r: r.id)[: args.queries], 256)
             for d in ("medical", "financial", "legal")]
    _, head = split_model(model, 4)
    head.model.embed_tokens.warm([(q.context, q.rows) for pool in pools for q in pool])
    rng = random.Random(0)
    batches = []
    for _ in range(args.steps):
        lam = {d: rng.choice((-1, 0, 1)) for d in range(3)}
        batches.append((lam, [rng.choice(pool) for pool in pools], [1 - lam[d] for d in range(3)]))
    run(head, batches[:1], level_logprobs, True)  # warm-up: allocator, first-call costs
    new_s, new_loss, new_w = run(head, batches, level_logprobs, True)
    old_s, old_loss, old_w = run(head, batches, padded_level_logprobs, False)
    loss_err = max(abs(a - b) for a, b in zip(new_loss, old_loss))
    # relative L2: Adam divides by sqrt(v), so an element whose gradient is ~0 turns float
    # noise into a full-size update; the max element error measures that noise, not the result
    w_err = float((new_w - old_w).norm() / old_w.norm())
    print(f"composed step, {args.steps} steps × 3 queries: today {new_s:.2f} s/step, round 1 {old_s:.2f} s/step "
          f"-> {old_s / new_s:.2f}x faster")
    print(f"same result: max |Δ loss| {loss_err:.1e}, ‖Δ vectors‖ / ‖vectors‖ {w_err:.1e} after {args.steps} steps")
    if loss_err > 1e-4 or w_err > 1e-2:
        raise SystemExit("the two steps disagree")


if __name__ == "__main__":
    main()
