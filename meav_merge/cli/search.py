"""``meav search``: coefficients for target levels, fitted on one split and reported on another.

Strategies spend the same budget of exact evaluations: ``surrogate`` (probe, predict,
correct), ``grid`` (the paper's exhaustive grid), ``cmaes`` (what mergekit-evolve uses),
``gradient`` (surrogate on half the budget, then per-block gradient fits for the
targets it missed). The table and the recipes use the held-out split's numbers.
"""

from __future__ import annotations

import json
import time
from typing import Dict, List, Sequence

import yaml

from meav_merge.data.schema import PROFICIENCY_LEVELS
from meav_merge.evaluation.scoring import dominant
from meav_merge.evaluation.search import Target, all_targets

STRATEGIES = ("surrogate", "grid", "cmaes", "gradient", "levels")
SHORT = {"expert": "Exp", "generic": "Gen", "avoidance": "Avd"}


def parse_named(specs: Sequence[str], what: str) -> Dict[str, str]:
    out = {}
    for spec in specs:
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            if not sep or not name.strip() or not value.strip():
                raise ValueError(f"--{what}: expected domain=value, got '{part}'")
            out[name.strip()] = value.strip()
    return out


def recipe_yaml(base_model: str, vector_paths: Sequence[str], target: Target, lambdas: Sequence[object],
                note: str = "") -> str:
    lines = [f"# Found by `meav search` for target {', '.join(f'{d}={lv}' for d, lv in target.items())}.",
             f"# {note}".rstrip()]
    body = {"merge_method": "meav", "base_model": base_model,
            "models": [{"model": p, "parameters": {"lambda": lam}} for p, lam in zip(vector_paths, lambdas)],
            "dtype": "float32"}
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def markdown_table(rows: List[dict], domains: Sequence[str], split: str) -> str:
    """One row per target: its λ, each domain's fractions (E/G/A) on ``split``, and whether it is reached."""
    head = "| target | λ (" + ", ".join(domains) + ") | " + " | ".join(f"{d} E/G/A" for d in domains) + " | reached |"
    lines = [f"Fractions on the {split} split; **bold** = target level dominant there.", "", head,
             "|" + "---|" * (3 + len(domains))]
    for r in rows:
        cells = []
        for d in domains:
            fr, lv = r["fractions"][d], r["target"][d]
            txt = "/".join(f"{fr[x]:.2f}" for x in PROFICIENCY_LEVELS)
            cells.append(f"**{txt}**" if dominant(fr) == lv else txt)
        lam = "per block" if r.get("per_block") else ", ".join(f"{r['lambda'][d]:+.2f}" for d in domains)
        key = ",".join(SHORT[r["target"][d]] for d in domains)
        lines.append(f"| {key} | {lam} | " + " | ".join(cells) + f" | {'yes' if r['reached'] else 'no'} |")
    n = sum(r["reached"] for r in rows)
    lines += ["", f"{n}/{len(rows)} targets reached on {split}."]
    return "\n".join(lines)


def _targets(args, domains: List[str]) -> List[Target]:
    if args.all:
        return all_targets(domains)
    if not args.target:
        raise ValueError("give --target domain=level,... or --all")
    t = parse_named([args.target], "target")
    if set(t) != set(domains):
        raise ValueError(f"--target must name every vector's domain ({', '.join(domains)})")
    for d, lv in t.items():
        if lv not in PROFICIENCY_LEVELS:
            raise ValueError(f"--target {d}={lv}: level must be one of {', '.join(PROFICIENCY_LEVELS)}")
    return [{d: t[d] for d in domains}]


def run_strategy(strategy: str, evaluator, targets, args):
    from meav_merge.evaluation.search import SearchConfig, grid_search, search
    from meav_merge.evaluation.strategies import cmaes_search, gradient_refine, levels_search

    blocks = {}
    if strategy == "grid":
        results = grid_search(evaluator, targets, step=args.grid_step, low=args.low, high=args.high)
    elif strategy == "levels":
        results = levels_search(evaluator, targets, budget=args.budget, low=args.low, high=args.high)
    elif strategy == "cmaes":
        results = cmaes_search(evaluator, targets, budget=args.budget, low=args.low, high=args.high)
    else:
        budget = args.budget if strategy == "surrogate" else max(1, args.budget // 2)
        results = search(evaluator, targets, SearchConfig.spanning(args.low, args.high, budget=budget))
        if strategy == "gradient":
            blocks = gradient_refine(evaluator, results, steps=args.fit_steps, queries_per_domain=args.fit_queries,
                                     budget=args.budget)
    return results, blocks


def _cmd_search(args) -> None:
    from meav_merge.evaluation.search import ExactEvaluator
    from meav_merge.evaluation.strategies import held_out
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.io.checkpoint import atomic_output_dir
    from meav_merge.vectors.alignment_vector import AlignmentVector

    if not args.low < args.high:
        raise ValueError(f"--low {args.low:g} must be below --high {args.high:g}")
    if args.report_split == args.split:
        raise ValueError(f"--report-split {args.report_split}: report on a split the coefficients were not fitted on")
    vectors = parse_named(args.vector, "vector")
    domains = list(vectors)
    targets = _targets(args, domains)
    rm = ReweightableModel(args.model, [AlignmentVector.load(p) for p in vectors.values()])
    evaluator = ExactEvaluator(rm, args.data, domains, split=args.split, limit=args.limit)
    started = time.time()
    results, blocks = run_strategy(args.strategy, evaluator, targets, args)
    spent = evaluator.count
    rows = [{"target": r.target, "lambda": dict(zip(domains, r.coefficients)), "fractions": r.fractions,
             "worst_margin": r.margin, "reached": r.reached, "per_block": k in blocks} for k, r in enumerate(results)]
    for k, b in blocks.items():
        rows[k].update(fractions=b.fractions, worst_margin=b.margin, reached=b.reached)
    report = {"strategy": args.strategy, "fit_split": args.split, "model": args.model, "vectors": vectors,
              "exact_evaluations": spent, "budget": args.budget, "wall_seconds": None,
              "paper_grid_evaluations": 21 ** len(domains), "range": [args.low, args.high],
              "fit": {"reached": sum(r["reached"] for r in rows), "results": rows}}
    if args.report_split != "none":
        test = ExactEvaluator(rm, args.data, domains, split=args.report_split, limit=args.report_limit)
        held = held_out(results, blocks, test)
        for h, row in zip(held, rows):
            h["lambda"] = row["lambda"]
        report["report_split"] = args.report_split
        report["held_out"] = {"reached": sum(h["reached"] for h in held), "results": held}
    report["wall_seconds"] = round(time.time() - started, 1)
    shown, split = (report["held_out"]["results"], args.report_split) if "held_out" in report else (rows, args.split)
    table = markdown_table(shown, domains, split)
    with atomic_output_dir(args.out, force=args.force) as tmp:
        (tmp / "search_report.json").write_text(json.dumps(report, indent=2, default=float))
        (tmp / "README.md").write_text(f"# meav search ({args.strategy})\n\nFitted on {args.split}, "
                                       f"{spent} exact evaluations.\n\n{table}\n")
        for k, r in enumerate(results):
            name = "_".join(f"{d}-{lv}" for d, lv in r.target.items())
            lambdas = blocks[k].lambda_settings if k in blocks else [float(c) for c in r.coefficients]
            note = f"{split} worst margin {shown[k]['worst_margin']:+.3f}"
            (tmp / f"{name}.yaml").write_text(recipe_yaml(args.model, list(vectors.values()), r.target, lambdas, note))
    print(table)
    print(f"\n{args.strategy}: {report['fit']['reached']}/{len(rows)} reached on {args.split} with {spent} exact "
          f"evaluations ({report['wall_seconds']} s); report: {args.out}/README.md")


def add_cli(sub) -> None:
    from meav_merge.coefficients import number_arg
    from meav_merge.cli.options import add_model
    from meav_merge.resources import data_dir

    p = sub.add_parser("search", help="find multi-domain λ for target levels (few exact evaluations)")
    add_model(p, "target model")
    p.add_argument("--vector", action="append", required=True, help="domain=DIR, once per domain")
    p.add_argument("--target", help="e.g. medical=avoidance,financial=generic,legal=expert")
    p.add_argument("--all", action="store_true", help="all 3^n target combinations")
    p.add_argument("--data", default=str(data_dir()), help="data folder or file (default: the shipped data)")
    p.add_argument("--split", default="validation", help="split the coefficients are fitted on (default: %(default)s)")
    p.add_argument("--report-split", default="test",
                   help="split the chosen coefficients are scored on for the table, or 'none' (default: %(default)s)")
    p.add_argument("--limit", type=number_arg("--limit", integer=True, positive=True),
                   help="queries per domain for fitting")
    p.add_argument("--report-limit", type=number_arg("--report-limit", integer=True, positive=True),
                   help="queries per domain for the held-out report")
    p.add_argument("--strategy", choices=STRATEGIES, default="surrogate", help="how to spend the budget (levels: first the λ each vector's calibration gives each level)")
    p.add_argument("--budget", type=number_arg("--budget", integer=True, positive=True), default=100,
                   help="most exact evaluations to spend; the surrogate strategy first probes each axis and "
                        "pair, 1 + 6n + 2n(n-1) evaluations for n vectors (31 for 3), whatever the budget "
                        "(default: %(default)s)")
    p.add_argument("--fit-steps", type=number_arg("--fit-steps", integer=True, positive=True), default=12,
                   help="gradient steps per missed target, each counted as one evaluation (default: %(default)s)")
    p.add_argument("--fit-queries", type=number_arg("--fit-queries", integer=True, positive=True), default=8,
                   help="queries per domain each gradient step differentiates through (all of --limit are used "
                        "to check the result; default: %(default)s)")
    p.add_argument("--low", type=number_arg("--low"), default=-4.0, help="smallest λ considered (default: %(default)s)")
    p.add_argument("--high", type=number_arg("--high"), default=4.0, help="largest λ considered (default: %(default)s)")
    p.add_argument("--grid", dest="strategy", action="store_const", const="grid", help="same as --strategy grid")
    p.add_argument("--grid-step", type=number_arg("--grid-step", positive=True), default=0.5,
                   help="grid spacing for --strategy grid (default: %(default)s)")
    p.add_argument("--out", required=True, help="report folder (search_report.json, README.md, one recipe per target)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_search)
