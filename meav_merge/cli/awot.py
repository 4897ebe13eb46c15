"""``meav awot ...``: generate with AWOT steering, and the two AWOT evaluations.

Wire it into ``meav_merge.cli.build_parser`` with ``add_cli(sub)``; handlers import
torch and transformers lazily so ``meav --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

from meav_merge.coefficients import number_arg


def _awot_config(args):
    from meav_merge.awot import AWOTConfig

    # pre_norm has no closed form, so it picks the iterative path unless told otherwise.
    method = args.method or ("iterative" if args.state == "pre_norm" else "closed_form")
    return AWOTConfig(alpha=args.alpha, steps=args.steps, penalty=args.penalty, method=method, state=args.state)


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

    cfg = SentimentEvalConfig(n=args.n, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                              alpha=args.alpha, steps=args.steps, penalty=args.penalty, anchors=args.anchors,
                              best_of=args.best_of, prompt_format=args.format, seed=args.seed, batch_size=args.batch_size,
                              methods=tuple(args.methods.split(",")) if args.methods else ())
    summary = evaluate_sentiment(args.model, args.out, cfg, prompts=args.prompts, force=args.force)
    print(markdown_table(summary), end="")
    print(f"written to {args.out}")


def _cmd_eval_hh(args) -> None:
    from meav_merge.awot.evaluate import evaluate_hh
    from meav_merge.io.checkpoint import atomic_output_dir

    if args.out and Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out}: already exists (pass --force to overwrite)")
    res = evaluate_hh(args.model, args.aligned, args.data, _awot_config(args), top_k=args.top_k)
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


def _add_awot_args(p, alpha: float) -> None:
    p.add_argument("--alpha", type=number_arg("--alpha", minimum=0), default=alpha,
                   help="step size α (default: %(default)s)")
    p.add_argument("--steps", type=_count("--steps", 0), default=60, help="ascent steps n (default: %(default)s)")
    p.add_argument("--penalty", type=number_arg("--penalty", minimum=0), default=0.0,
                   help="λ of the L2 penalty on the change (default: 0)")


def _count(key: str, minimum: int = 1):
    return number_arg(key, integer=True, minimum=minimum)


def _add_state_args(p) -> None:
    p.add_argument("--method", choices=["closed_form", "iterative"],
                   help="default: closed_form for lm_head_input, iterative for pre_norm")
    p.add_argument("--state", choices=["lm_head_input", "pre_norm"], default="lm_head_input",
                   help="which state to tune (default: %(default)s)")


def add_cli(subparsers) -> None:
    """Register ``awot generate | eval-sentiment | eval-hh`` on the ``meav`` subparsers."""
    awot = subparsers.add_parser("awot", help="anchor-words tuning (AWOT) at generation time")
    sub = awot.add_subparsers(dest="awot_command", required=True)

    p = sub.add_parser("generate", help="generate one reply with AWOT steering")
    p.add_argument("--model", required=True, help="model directory (safetensors)")
    p.add_argument("--anchors", default="sentiment",
                   help="'sentiment', 'sentiment-a1', a JSON file {positive: [...], negative: [...]}, or "
                        "auto:ALIGNED_DIR (anchors by log π_aligned/π_model, needs --auto-data)")
    p.add_argument("--auto-data", help="preference data for auto anchors (its train split), e.g. data/safety.jsonl")
    p.add_argument("--top-k", type=_count("--top-k"), default=20, help="auto anchors per side (default: %(default)s)")
    _add_awot_args(p, alpha=2.0)
    _add_state_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--max-new-tokens", type=_count("--max-new-tokens"), default=128)
    p.add_argument("--repetition-penalty", type=number_arg("--repetition-penalty", positive=True), default=1.5, help="(paper: 1.5; default: %(default)s)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval-sentiment", help="controlled sentiment generation: base, prompting, AWOT, best-of-N")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="output directory (generations.csv, summary.csv/.json/.md)")
    p.add_argument("--n", type=_count("--n"), default=100, help="number of prompts (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=_count("--max-new-tokens"), default=48)
    p.add_argument("--prompts", help="JSONL of {id, text} openings (default: the shipped movie_review_openings)")
    p.add_argument("--anchors", default="sentiment", help="named set or JSON word file (default: %(default)s)")
    _add_awot_args(p, alpha=2.0)
    p.add_argument("--best-of", type=_count("--best-of"), default=4)
    p.add_argument("--format", choices=["chat", "plain"], default="chat",
                   help="prompt as the chat user message (default) or as a raw continuation prompt")
    p.add_argument("--repetition-penalty", type=number_arg("--repetition-penalty", positive=True), default=1.5)
    p.add_argument("--methods", help="comma-separated subset (base is always run: it is the timing reference)")
    p.add_argument("--seed", type=_count("--seed", 0), default=0)
    p.add_argument("--batch-size", type=_count("--batch-size"), default=1,
                   help="prompts per generate() call (1: the paper's timing setting; more: faster)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.set_defaults(func=_cmd_eval_sentiment)

    p = sub.add_parser("eval-hh", help="preference accuracy with and without AWOT (auto anchors from an aligned model)")
    p.add_argument("--model", required=True, help="model to steer (also π_ref for anchor selection)")
    p.add_argument("--aligned", required=True, help="aligned model (π*) with the same vocabulary")
    p.add_argument("--data", default="data/safety.jsonl", help="anchors from its train split, accuracy on test")
    p.add_argument("--top-k", type=_count("--top-k"), default=10, help="anchors per side (paper: 10)")
    _add_awot_args(p, alpha=0.5)
    _add_state_args(p)
    p.add_argument("--out", help="output directory for hh.json")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_eval_hh)
