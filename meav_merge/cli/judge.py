"""``meav judge``: generate answers at given λ and report the level fractions a judge gives them."""

from __future__ import annotations

import json
from pathlib import Path

from meav_merge.cli.options import (add_config_args, add_data, add_model, add_output, add_vectors, config_from_args,
                                    model_dir_arg, named_number_arg, named_numbers, named_vectors)
from meav_merge.coefficients import number_arg
from meav_merge.evaluation.level_classifier import LEVELS, UNPARSED, JudgeError, LevelClassifierConfig


def _format_table(result: dict, title: str) -> str:
    lines = [title, f"{'level':<10} {'fraction':>8}"]
    lines += [f"{lv:<10} {result[lv]:8.3f}" for lv in LEVELS + (UNPARSED,) if lv in result]
    held = result["judge"].get("heldout_accuracy")
    if held:
        per = "  ".join(f"{lv} {acc:.3f}" for lv, acc in held["per_level"].items() if acc is not None)
        lines.append(f"judge held-out accuracy {held['overall']:.3f} on {held['n']} {held['split'] or ''} "
                     f"dataset responses ({per}); model answers are out of its training distribution")
    else:
        lines.append("judge held-out accuracy: not measured (pass --calibrate N to measure it)")
    if "answer_confidence" in result["judge"] and held and "mean_confidence" in held:
        lines.append(f"classifier confidence {result['judge']['answer_confidence']:.2f} on these answers vs "
                     f"{held['mean_confidence']:.2f} on held-out responses (lower: answers unlike its training data)")
    return "\n".join(lines)


def _build_judge(args):
    from meav_merge.evaluation.level_classifier import LevelClassifier, default_classifier
    from meav_merge.evaluation.llm_judge import LLMJudge

    if args.judge == "classifier":
        if args.classifier:
            return LevelClassifier.load(args.classifier)
        return default_classifier(args.data, config=config_from_args(LevelClassifierConfig, args))
    if not args.base_url or not args.judge_model:
        raise JudgeError("--judge llm needs --base-url and --judge-model")
    return LLMJudge(args.base_url, args.judge_model, api_key_env=args.api_key_env, concurrency=args.concurrency)


def _write(out: Path, answers, labels, result: dict) -> None:
    with open(out / "answers.jsonl", "w", encoding="utf-8") as f:
        for a, label in zip(answers, labels):
            row = {"id": a.id, "domain": a.domain, "query": a.query, "answer": a.text, "label": label,
                   "n_tokens": a.n_tokens, "finished": a.finished}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "judged.json").write_text(json.dumps(result, indent=2))


def _fluency(args, rm, answers, vectors) -> dict:
    """distinct-2, and the answers' log-prob under an unsteered model: --reference, or the
    target itself at λ = 0 when the steering came from --vector."""
    from meav_merge.evaluation.fluency import fluency_summary, reference_logprobs

    logprobs = None
    if args.reference:
        from meav_merge.evaluation.sweep import ReweightableModel

        ref = ReweightableModel(args.reference)
        logprobs = reference_logprobs(ref.model, ref.tokenizer, answers, system=args.system)
    elif vectors:
        rm.set([0.0] * len(vectors))
        logprobs = reference_logprobs(rm.model, rm.tokenizer, answers, system=args.system)
    return {**fluency_summary(answers, logprobs), "reference": str(args.reference or args.model) if logprobs else None}


def _cmd_judge(args) -> None:
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.generation import generate_answers
    from meav_merge.evaluation.judge import judged_accuracy
    from meav_merge.evaluation.llm_judge import LLMJudge
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.io.checkpoint import atomic_output_dir
    from meav_merge.vectors.alignment_vector import AlignmentVector

    if Path(args.out).exists() and not args.force:  # before minutes of generation, not after
        raise FileExistsError(f"{args.out}: already exists (pass --force to overwrite)")
    vectors = named_vectors(args.vector)
    lambdas = named_numbers(args.lambdas, "--lambda", vectors)
    records = load_records(args.data, args.domain, args.split)[: args.n]
    judge = _build_judge(args)
    if isinstance(judge, LLMJudge) and args.calibrate:
        judge.heldout_accuracy(load_records(args.data, args.domain, "test"), limit=args.calibrate)
    rm = ReweightableModel(args.model, [AlignmentVector.load(v) for v in vectors.values()], transfer=args.transfer)
    if vectors:
        rm.set(list(lambdas.values()))
    answers = generate_answers(rm.model, rm.tokenizer, records, max_new_tokens=args.max_new_tokens,
                               system=args.system, batch_size=args.batch_size,
                               repetition_penalty=args.repetition_penalty)
    labels = judge.judge(answers)
    result = judged_accuracy(answers, judge, labels)
    result["fluency"] = _fluency(args, rm, answers, vectors)
    result["config"] = {"model": str(args.model), "vectors": vectors, "lambdas": lambdas,
                        "domain": args.domain, "data": str(args.data), "split": args.split, "n": len(records),
                        "max_new_tokens": args.max_new_tokens, "system": args.system,
                        "repetition_penalty": args.repetition_penalty,
                        "stopped_at_max_new_tokens": sum(not a.finished for a in answers)}
    with atomic_output_dir(args.out, force=args.force) as tmp:
        _write(tmp, answers, labels, result)
    lam = ", ".join(f"{n} λ={x:g}" for n, x in lambdas.items()) or "no vectors"
    print(_format_table(result, f"judged generation accuracy: {args.domain} {args.split}, n={len(records)}, {lam}, "
                                f"judge={args.judge}"))
    flu = result["fluency"]
    print(f"fluency: distinct-2 {flu['distinct_2']:.2f}" + (
        f", mean log-prob under the unsteered {flu['reference']} {flu['reference_logprob']:.2f}"
        if flu.get("reference_logprob") is not None else " (pass --reference BASE for the log-prob check)"))
    print(f"{result['config']['stopped_at_max_new_tokens']}/{len(records)} answers stopped at "
          f"--max-new-tokens {args.max_new_tokens}; written to {args.out}")


def add_cli(subparsers) -> None:
    """Register ``meav judge`` on the ``meav`` subparsers."""
    p = subparsers.add_parser("judge", help="generate answers and judge their level (judged generation accuracy)")
    add_model(p)
    add_vectors(p, required=False, help="vector to add, NAME=DIR (repeat or comma-separate; default: none)")
    p.add_argument("--lambda", dest="lambdas", action="append", default=[], metavar="NAME=λ",
                   type=named_number_arg("--lambda"),
                   help="coefficient of each --vector by its NAME, e.g. medical=4.0 (repeat or comma-separate)")
    p.add_argument("--transfer", action="store_true", help="allow vectors extracted from a different base model")
    p.add_argument("--reference", type=model_dir_arg("--reference"), help="unsteered model for the fluency check (the answers' log-prob under it; "
                                       "default: --model at λ = 0 when --vector is given)")
    p.add_argument("--domain", required=True, help="domain to answer queries of, e.g. medical")
    add_data(p)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="split whose queries are answered (default: %(default)s)")
    p.add_argument("--n", type=number_arg("--n", integer=True, positive=True),
                   help="answer only the first N queries of the split (default: all)")
    p.add_argument("--max-new-tokens", type=number_arg("--max-new-tokens", integer=True, positive=True), default=128,
                   help="longest answer in tokens (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=number_arg("--repetition-penalty", positive=True), default=1.0,
                   help="HF repetition penalty, still greedy (default: %(default)s, plain greedy as the paper; "
                        "1.1 keeps steered answers out of loops on SmolLM2-135M)")
    p.add_argument("--batch-size", type=number_arg("--batch-size", integer=True, positive=True), default=8,
                   help="answers generated together (default: %(default)s)")
    p.add_argument("--system", help="system prompt for the chat template")
    p.add_argument("--judge", choices=["classifier", "llm"], default="classifier",
                   help="offline level classifier or an OpenAI-compatible LLM (default: %(default)s)")
    p.add_argument("--classifier", help="a saved LevelClassifier (default: trained on --data's train split, cached)")
    add_config_args(p, LevelClassifierConfig)
    p.add_argument("--base-url", help="OpenAI-compatible endpoint for --judge llm, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", help="model name at --base-url")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=number_arg("--concurrency", integer=True, positive=True), default=4,
                   help="parallel judge requests with --judge llm (default: %(default)s)")
    p.add_argument("--calibrate", type=number_arg("--calibrate", integer=True, minimum=0), default=0, metavar="N",
                   help="--judge llm: first judge the dataset responses of N test records to measure its accuracy")
    add_output(p, "output directory (answers.jsonl, judged.json)")
    p.set_defaults(func=_cmd_judge)
