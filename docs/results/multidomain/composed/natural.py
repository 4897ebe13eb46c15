"""The composed vectors at the λ they were trained for, no search: +1 expert, 0 generic, −1
avoidance in each domain, all 27 targets scored on the whole test split.

Nothing is fitted, so this is a held-out number by construction. Points the grid search
already scored on test (``search_grid/search_report.json``) are reused, not rescored:
scoring is deterministic. Run from the repository root after ``run.sh``:

    .venv/bin/python docs/results/multidomain/composed/natural.py

For vectors the grid search did not score (say, a retraining), ``--reuse none`` scores all 27
points and ``--out`` puts the table elsewhere. ``--level legal.expert=1.25`` moves one level of one
domain off its trained λ (a value fitted on validation, say); ``--reuse`` then also takes an earlier
output of this script for the same vectors, so only the points that moved are scored again.
Fitting such a value: ``--split validation --where legal=expert --level legal.expert=X`` scores the
combinations that ask legal for expert, on validation, at that X.
"""

import argparse
import json
from pathlib import Path

from meav_merge.evaluation.scoring import dominant
from meav_merge.evaluation.search import ExactEvaluator, all_targets
from meav_merge.evaluation.sweep import ReweightableModel
from meav_merge.resources import data_dir
from meav_merge.vectors.alignment_vector import AlignmentVector

HERE = Path(__file__).parent
DOMAINS = ["medical", "financial", "legal"]
LAMBDA = {"expert": 1.0, "generic": 0.0, "avoidance": -1.0}

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--run", type=Path, default=Path("runs/composed"), help="meav train-composed's output folder")
ap.add_argument("--out", type=Path, default=HERE / "natural.json")
ap.add_argument("--reuse", default=str(HERE / "search_grid" / "search_report.json"),
                help="a search report or an earlier output of this script, same vectors, whose test points are "
                     "reused; 'none' to score all")
ap.add_argument("--level", action="append", default=[], metavar="DOMAIN.LEVEL=LAMBDA",
                help="the λ one domain uses for one level instead of the trained +1/0/-1 (repeatable)")
ap.add_argument("--split", default="test", help="split to score (default: %(default)s)")
ap.add_argument("--where", metavar="DOMAIN=LEVEL", help="only the combinations that ask DOMAIN for LEVEL")
args = ap.parse_args()
levels = {d: dict(LAMBDA) for d in DOMAINS}
for spec in args.level:
    key, _, value = spec.partition("=")
    domain, _, level = key.partition(".")
    if domain not in levels or level not in LAMBDA:
        ap.error(f"--level {spec}: expected DOMAIN.LEVEL=LAMBDA with DOMAIN in {DOMAINS}, LEVEL in {list(LAMBDA)}")
    levels[domain][level] = float(value)
RUN = args.run
known = {}
if args.reuse != "none":
    report = json.loads(Path(args.reuse).read_text())
    searched = report["held_out"]["results"] if "held_out" in report else report["results"]
    if report.get("split", "test") != args.split:  # a search report's held-out points are test points
        ap.error(f"--reuse {args.reuse}: its points are on {report.get('split')}, not {args.split}")
    known = {tuple(r["lambda"][d] for d in DOMAINS): r["fractions"] for r in searched}
rm = ReweightableModel(RUN / "centered", [AlignmentVector.load(RUN / "vectors" / d) for d in DOMAINS])
test = ExactEvaluator(rm, str(data_dir()), DOMAINS, split=args.split)
only = {}
if args.where:
    domain, _, level = args.where.partition("=")
    if domain not in DOMAINS or level not in LAMBDA:
        ap.error(f"--where {args.where}: expected DOMAIN=LEVEL with DOMAIN in {DOMAINS}, LEVEL in {list(LAMBDA)}")
    only = {domain: level}
rows = []
for target in all_targets(DOMAINS):
    if any(target[d] != lv for d, lv in only.items()):
        continue
    lam = tuple(levels[d][target[d]] for d in DOMAINS)
    fractions = known.get(lam) or test(lam).fractions
    reached = all(dominant(fractions[d]) == target[d] for d in DOMAINS)
    rows.append({"target": dict(target), "lambda": dict(zip(DOMAINS, lam)), "fractions": fractions,
                 "reached": reached, "rescored": lam not in known})
n = sum(r["reached"] for r in rows)
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps({"reached": n, "of": len(rows), "split": args.split, "levels": levels,
                                               "new_evaluations": test.count, "results": rows}, indent=2))
print(f"{n}/{len(rows)} reached on {args.split} at λ {levels} ({test.count} new exact evaluations)")
for r in rows:
    if not r["reached"]:
        print("missed", r["target"], {d: {k: round(v, 2) for k, v in r["fractions"][d].items()} for d in DOMAINS})
