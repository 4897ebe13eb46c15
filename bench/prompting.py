"""The cost of prompting for a level, against a merged MEAV model (MEAV paper, Table 1).

Prompting asks the unchanged model for a level in the system prompt; MEAV merges a vector
once and then answers the bare query. Per query this compares, side by side in one run:

- prompt tokens: what the model reads before answering (and before scoring responses);
- wall seconds to answer: greedy, batch 1, exactly ``--tokens`` new tokens each (so both
  make the same number of tokens), the two interleaved per query so load hits both alike;
- the same for prefill alone (one forward over the prompt), the part a longer prompt grows.

The merged model is the target plus the vector at ``--lambda`` (in memory: the weights
differ, the architecture and so the arithmetic per token do not). Preference accuracy of
each technique is ``meav eval table1``'s, on the same queries.

    .venv/bin/python bench/prompting.py --model runs/composed/centered \\
        --vector medical=runs/composed/vectors/medical --lambda 1 --out docs/results/prompting_cost
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def plot(result: dict, path: Path) -> Path:
    """Bars of each per-query mean, prompting beside MEAV, with the ratio above each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("prompt_tokens", "prompt tokens"), ("prefill_s", "prefill (s)"),
            ("answer_s", f"answer, {result['new_tokens']} tokens (s)")]
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 2.8), dpi=120)
    for ax, (k, label) in zip(axes, keys):
        values = [result["mean"]["prompting"][k], result["mean"]["meav"][k]]
        ax.bar(["prompting", "MEAV"], values, color=["#b2182b", "#1b7837"])
        ax.set_title(f"{label}: {result['prompting_over_meav'][k]:.2f}x", fontsize=9)
    fig.suptitle(f"per query, {result['domain']} test, n = {result['n']}, batch 1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    import torch

    from meav_merge.awot import load_causal_lm
    from meav_merge.cli.options import one_vector
    from meav_merge.coefficients import number_arg
    from meav_merge.awot.evaluate import generate
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.scoring import chat_context, tok_encode
    from meav_merge.evaluation.tables import LEVEL_PROMPTS
    from meav_merge.resources import DEFAULT_MODEL_DIR, data_dir
    from meav_merge.vectors.alignment_vector import AlignmentVector, apply_vectors

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="the target model both techniques start from")
    p.add_argument("--vector", required=True, help="DOMAIN=DIR: the vector merged, and whose test queries are used")
    p.add_argument("--lambda", dest="lam", type=number_arg("--lambda"), default=1.0, help="λ of the merged vector")
    p.add_argument("--level", default="expert", choices=sorted(LEVEL_PROMPTS), help="the level prompting asks for")
    p.add_argument("--queries", type=number_arg("--queries", integer=True, positive=True), default=12)
    p.add_argument("--tokens", type=number_arg("--tokens", integer=True, positive=True), default=48,
                   help="new tokens per answer")
    p.add_argument("--out", type=Path, help="folder for prompting_cost.json")
    args = p.parse_args(argv)
    try:
        domain, vector_dir = one_vector([args.vector])
    except ValueError as e:
        p.error(str(e))

    prompting, tok = load_causal_lm(args.model)
    merged, _ = load_causal_lm(args.model)
    apply_vectors(merged, [(AlignmentVector.load(vector_dir), args.lam)])
    records = load_records(data_dir(), domain, "test")[: args.queries]
    contexts = {"prompting": [chat_context(tok, r.query, LEVEL_PROMPTS[args.level]) for r in records],
                "meav": [chat_context(tok, r.query) for r in records]}
    models = {"prompting": prompting, "meav": merged}
    generate(merged, tok, contexts["meav"][0], 4)  # warm-up, untimed
    rows = {m: {"prompt_tokens": [], "answer_s": [], "prefill_s": []} for m in models}
    for i in range(len(records)):
        for m in (["prompting", "meav"] if i % 2 == 0 else ["meav", "prompting"]):
            ids = tok_encode(tok, contexts[m][i])
            started = time.perf_counter()
            with torch.no_grad():
                models[m](input_ids=torch.tensor([ids]))
            prefill = time.perf_counter() - started
            gen = generate(models[m], tok, contexts[m][i], args.tokens, min_new_tokens=args.tokens,
                           repetition_penalty=1.0)
            assert gen.counts[0] == args.tokens, (m, gen.counts)
            rows[m]["prompt_tokens"].append(len(ids))
            rows[m]["answer_s"].append(gen.seconds)
            rows[m]["prefill_s"].append(prefill)
    summary = {m: {k: statistics.mean(v) for k, v in r.items()} for m, r in rows.items()}
    ratio = {k: summary["prompting"][k] / summary["meav"][k] for k in summary["meav"]}
    result = {"model": args.model, "vector": vector_dir, "lambda": args.lam, "level_prompt": args.level,
              "domain": domain, "split": "test", "n": len(records), "new_tokens": args.tokens,
              "threads": torch.get_num_threads(), "mean": summary, "prompting_over_meav": ratio, "per_query": rows}
    print(f"{domain}, {len(records)} test queries, {args.tokens} new tokens each, batch 1:")
    for k, label in (("prompt_tokens", "prompt tokens"), ("prefill_s", "prefill s"), ("answer_s", "answer s")):
        print(f"  {label:14s} prompting {summary['prompting'][k]:8.3f}   meav {summary['meav'][k]:8.3f}   "
              f"ratio {ratio[k]:.2f}x")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "prompting_cost.json").write_text(json.dumps(result, indent=2))
        plot(result, args.out / "prompting_cost.png")
        print(f"wrote {args.out / 'prompting_cost.json'} and prompting_cost.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
