"""``meav awot ...``: generate with AWOT steering, and the two AWOT evaluations.

Registered by ``meav_merge.cli.main.build_parser``; handlers import torch and
transformers lazily so ``meav --help`` stays fast. The AWOT and sentiment-evaluation
flags are generated from ``AWOTConfig`` and ``SentimentEvalConfig``.
"""

from __future__ import annotations

import json
from pathlib import Path

from meav_merge.cli.options import (add_config_args, add_data, add_model, add_output, config_from_args,
                                    model_dir_arg)
from meav_merge.coefficients import number_arg


def _awot_config(args):
    from meav_merge.awot import AWOTConfig

    # pre_norm has no closed form, so it picks the iterative path unless told otherwise.
    method = args.method or ("iterative" if args.state == "pre_norm" else "closed_form")
    return config_from_args(AWOTConfig, args, method=method)


def _cmd_generate(args) -> None:
    import sys

    from meav_merge.awot import awot_steering, load_causal_lm, resolve_anchors
    from meav_merge.awot.evaluate import generate
    from meav_merge.evaluation.scoring import chat_context

    config = _awot_config(args)
    model, tokenizer = load_causal_lm(args.model)
    anchors = resolve_anchors(args.anchors, model, tokenizer, auto_data=args.auto_data, top_k=args.top_k)
    print(anchors.describe(), file=sys.stderr)
    prompt = args.prompt if args.raw else chat_context(tokenizer, args.prompt, args.system)
    with awot_steering(model, anchors, config):
        gen = generate(model, tokenizer, prompt, args.max_new_tokens, args.repetition_penalty)
    print(gen.texts[0])


def _cmd_eval_sentiment(args) -> None:
    from meav_merge.awot.evaluate import SentimentEvalConfig, evaluate_sentiment, markdown_table

    cfg = config_from_args(SentimentEvalConfig, args)
    summary = evaluate_sentiment(args.model, args.out, cfg, prompts=args.prompts, force=args.force)
    print(markdown_table(summary), end="")
    print(f"written to {args.out}")


def _cmd_eval_hh(args) -> None:
    from meav_merge.awot.evaluate import evaluate_hh
    from meav_merge.io.checkpoint import atomic_output_dir

    if args.out and Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out}: already exists (pass --force to overwrite)")
    res = evaluate_hh(args.model, args.aligned, args.data, _awot_config(args), top_k=args.top_k, domain=args.domain)
    a = res["anchors"]
    print(f"anchors P: {' '.join(repr(t) for t in a['positive_tokens'])}")
    print(f"anchors N: {' '.join(repr(t) for t in a['negative_tokens'])}")
    best = res["levels"][0]
    print(f"{res['n_test']} test queries: accuracy ({best} wins) {res['accuracy'][best]:.3f} -> "
          f"{res['accuracy_awot'][best]:.3f} with AWOT; mean log-prob margin {res['mean_margin']:+.4f} -> "
          f"{res['mean_margin_awot']:+.4f}")
    if args.out:
        with atomic_output_dir(args.out, force=args.force) as tmp:
            (tmp / "hh.json").write_text(json.dumps(res, indent=2, ensure_ascii=False))
        print(f"written to {args.out}/hh.json")


def _count(key: str, minimum: int = 1):
    return number_arg(key, integer=True, minimum=minimum)


def _add_awot_args(p, alpha: float) -> None:
    from meav_merge.awot import AWOTConfig

    # --method's default is left open: the handler picks iterative for pre_norm.
    add_config_args(p, AWOTConfig, defaults={"alpha": alpha, "method": None})


def add_cli(subparsers) -> None:
    """Register ``awot generate | eval-sentiment | eval-hh`` on the ``meav`` subparsers."""
    from meav_merge.awot.evaluate import SentimentEvalConfig

    awot = subparsers.add_parser("awot", help="anchor-words tuning (AWOT) at generation time")
    sub = awot.add_subparsers(dest="awot_command", required=True)

    p = sub.add_parser("generate", help="generate one reply with AWOT steering")
    add_model(p, "model directory (safetensors)")
    p.add_argument("--anchors", default="sentiment",
                   help="'sentiment', 'sentiment-a1', a JSON file {positive: [...], negative: [...]}, or "
                        "auto:ALIGNED_DIR (anchors by log π_aligned/π_model, from --auto-data's train split)")
    p.add_argument("--auto-data", help="preference data file for auto anchors, e.g. data/safety.jsonl")
    p.add_argument("--top-k", type=_count("--top-k"), default=20, help="auto anchors per side (default: %(default)s)")
    _add_awot_args(p, alpha=2.0)
    p.add_argument("--prompt", required=True, help="the user message (or raw prompt with --raw)")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--max-new-tokens", type=_count("--max-new-tokens"), default=128,
                   help="tokens to generate (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=number_arg("--repetition-penalty", positive=True), default=1.5,
                   help="paper: 1.5 (default: %(default)s)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval-sentiment", help="controlled sentiment generation: base, prompting, AWOT, best-of-N")
    add_model(p, "model directory (safetensors)")
    add_output(p, "output directory (generations.csv, summary.csv/.json/.md)")
    p.add_argument("--prompts", help="JSONL of {id, text} openings (default: the shipped movie_review_openings)")
    add_config_args(p, SentimentEvalConfig)
    p.set_defaults(func=_cmd_eval_sentiment)

    p = sub.add_parser("eval-hh", help="preference accuracy with and without AWOT (auto anchors from an aligned model)")
    add_model(p, "model to steer (also π_ref for anchor selection)")
    p.add_argument("--aligned", required=True, type=model_dir_arg("--aligned"), help="aligned model (π*) with the same vocabulary")
    add_data(p, "anchors from its train split, accuracy on its test split")
    p.add_argument("--domain", default="safety", help="domain of --data to use (default: %(default)s)")
    p.add_argument("--top-k", type=_count("--top-k"), default=10, help="anchors per side (paper and default: 10)")
    _add_awot_args(p, alpha=0.5)
    add_output(p, "output directory for hh.json", required=False)
    p.set_defaults(func=_cmd_eval_hh)
