"""Spill-over (paper Table 2): what each domain's vector does to every domain, its own included.

One model holds all vectors; each moves alone (one-hot direction) through the λ values,
and every domain's fractions are scored on the held-out split. Two summaries per vector:

- *spill*: the mean, over λ ≠ 0 and over the *other* domains, of the total-variation
  distance between their level fractions at λ and at λ = 0 (0 = the other domains are
  untouched, 1 = they are turned into another level entirely);
- *control*: for each level of its own domain, the smallest |λ| at which it is dominant
  (highest and above 1/3), or None.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Sequence

from meav_merge.data.schema import PROFICIENCY_LEVELS, load_records
from meav_merge.evaluation.scoring import prepare
from meav_merge.evaluation.search import margin
from meav_merge.evaluation.sweep import ReweightableModel, evaluate_point


def total_variation(a: Dict[str, float], b: Dict[str, float]) -> float:
    return 0.5 * sum(abs(a[k] - b[k]) for k in a)


def spillover(rm: ReweightableModel, names: Sequence[str], lambdas: Sequence[float], data: str,
              split: str = "test", limit: Optional[int] = None, move: Optional[Sequence[str]] = None) -> dict:
    """``names[i]`` is the domain of ``rm.vectors[i]``; every named domain is scored at every point.
    ``move``: the vectors to move (default: all), e.g. to compare one retrained vector."""
    prepared = {d: prepare(rm.tokenizer, load_records(data, d, split)[: limit or None]) for d in names}
    n = {d: len(p) for d, p in prepared.items()}

    def fractions(coefficients):
        return {d: evaluate_point(rm, coefficients, p, list(PROFICIENCY_LEVELS)).fractions
                for d, p in prepared.items()}

    zero = fractions([0.0] * len(names))
    rows, summary = [], {}
    for i, own in enumerate(names):
        if move and own not in move:
            continue
        spills, control = [], {lv: None for lv in PROFICIENCY_LEVELS}
        for lv in PROFICIENCY_LEVELS:
            if margin(zero[own], lv) > 0:
                control[lv] = 0.0
        for lam in lambdas:
            coeffs = [0.0] * len(names)
            coeffs[i] = lam
            fr = fractions(coeffs)
            rows.append({"vector": own, "lambda": lam, **{f"{d}:{lv}": fr[d][lv] for d in names
                                                           for lv in PROFICIENCY_LEVELS}})
            spills += [total_variation(fr[d], zero[d]) for d in names if d != own]
            for lv in PROFICIENCY_LEVELS:
                if margin(fr[own], lv) > 0 and (control[lv] is None or abs(lam) < abs(control[lv])):
                    control[lv] = lam
        summary[own] = {"spill": sum(spills) / max(1, len(spills)), "control": control}
    return {"split": split, "n": n, "lambdas": list(lambdas), "zero": zero, "rows": rows, "summary": summary}


def markdown(result: dict, title: str = "") -> str:
    names = list(result["n"])  # every scored domain, also when only some vectors moved
    head = "| vector | λ | " + " | ".join(f"{d} E/G/A" for d in names) + " |"
    lines = [f"### {title}".rstrip(), "", f"Fractions on {result['split']} (n = "
             + ", ".join(f"{d} {k}" for d, k in result["n"].items()) + "); λ = 0: "
             + "; ".join(f"{d} " + "/".join(f"{result['zero'][d][lv]:.2f}" for lv in PROFICIENCY_LEVELS)
                         for d in names), "", head, "|" + "---|" * (2 + len(names))]
    for r in result["rows"]:
        cells = ["/".join(f"{r[f'{d}:{lv}']:.2f}" for lv in PROFICIENCY_LEVELS) for d in names]
        lines.append(f"| {r['vector']} | {r['lambda']:+g} | " + " | ".join(cells) + " |")
    lines += ["", "| vector | spill (mean TV distance on other domains) | smallest λ with expert / generic / avoidance dominant |",
              "|---|---|---|"]
    for d, s in result["summary"].items():
        ctl = " / ".join("—" if v is None else f"{v:+g}" for v in s["control"].values())
        lines.append(f"| {d} | {s['spill']:.3f} | {ctl} |")
    return "\n".join(lines)


def _cmd_spillover(args) -> None:
    from meav_merge.cli.search import parse_named
    from meav_merge.io.checkpoint import atomic_output_dir
    from meav_merge.vectors.alignment_vector import AlignmentVector

    vectors = parse_named(args.vector, "vector")
    rm = ReweightableModel(args.model, [AlignmentVector.load(p) for p in vectors.values()])
    result = spillover(rm, list(vectors), args.lambdas, args.data, split=args.split, limit=args.limit,
                       move=args.move.split(",") if args.move else None)
    result["vectors"] = vectors
    text = markdown(result, args.title or "Spill-over")
    with atomic_output_dir(args.out, force=args.force) as tmp:
        (tmp / "spillover.json").write_text(json.dumps(result, indent=2))
        (tmp / "README.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out}/README.md and spillover.json")


def add_eval_cli(ev) -> None:
    from meav_merge.coefficients import lambdas_arg, number_arg
    from meav_merge.cli.options import add_model
    from meav_merge.resources import data_dir

    q = ev.add_parser("spillover", help="each domain vector alone at several λ, scored on every domain (Table 2)")
    add_model(q, "target model")
    q.add_argument("--vector", action="append", required=True, help="domain=DIR, once per domain")
    q.add_argument("--lambdas", default="-4,-2,-1,1,2,4", type=lambdas_arg(), help="λ values (default: %(default)s)")
    q.add_argument("--data", default=str(data_dir()), help="data folder or file (default: the shipped data)")
    q.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    q.add_argument("--limit", type=number_arg("--limit", integer=True, positive=True), help="queries per domain")
    q.add_argument("--move", help="comma-separated vectors to move (default: all); the others only fix the domains")
    q.add_argument("--title", help="heading of the markdown report")
    q.add_argument("--out", required=True, help="report folder")
    q.add_argument("--force", action="store_true", help="replace an existing --out")
    q.set_defaults(func=_cmd_spillover)
