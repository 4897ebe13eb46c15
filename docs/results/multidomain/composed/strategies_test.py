"""Each strategy's picks (fitted on validation, n = 20 per domain) scored on the whole test split.

The surrogate, CMA-ES and gradient searches ran with ``--report-split none`` (run.sh's
strategies). Here every target's chosen λ is scored on test; points already scored there
(``natural.json``, the grid's held-out report) are reused, since scoring is deterministic.
Run from the repository root after ``run.sh`` and ``natural.py``:

    .venv/bin/python docs/results/multidomain/composed/strategies_test.py
"""

import json
from pathlib import Path

from meav_merge.evaluation.scoring import dominant
from meav_merge.evaluation.search import ExactEvaluator
from meav_merge.evaluation.sweep import ReweightableModel
from meav_merge.resources import data_dir
from meav_merge.vectors.alignment_vector import AlignmentVector

HERE = Path(__file__).parent
RUN = Path("runs/composed")
DOMAINS = ["medical", "financial", "legal"]


def key(lam: dict) -> tuple:
    return tuple(round(float(lam[d]), 4) for d in DOMAINS)


known = {key(r["lambda"]): r["fractions"] for r in json.loads((HERE / "natural.json").read_text())["results"]}
grid = json.loads((HERE / "search_grid" / "search_report.json").read_text())
known.update({key(r["lambda"]): r["fractions"] for r in grid["held_out"]["results"]})
rm = ReweightableModel(RUN / "centered", [AlignmentVector.load(RUN / "vectors" / d) for d in DOMAINS])
test = ExactEvaluator(rm, str(data_dir()), DOMAINS, split="test")
out = {}
for strategy in ("surrogate", "cmaes", "gradient"):
    report = json.loads((HERE / f"search_{strategy}_validation" / "search_report.json").read_text())
    assert not any(r["per_block"] for r in report["fit"]["results"]), "per-block picks need BlockCoefficientFit"
    rows = []
    for r in report["fit"]["results"]:
        k = key(r["lambda"])
        if k not in known:
            known[k] = test(k).fractions
        fr = known[k]
        rows.append({"target": r["target"], "lambda": r["lambda"], "fractions": fr,
                     "reached_validation": r["reached"],
                     "reached": all(dominant(fr[d]) == lv for d, lv in r["target"].items())})
    out[strategy] = {"exact_evaluations": report["exact_evaluations"], "reached_validation": report["fit"]["reached"],
                     "reached": sum(r["reached"] for r in rows), "results": rows}
    print(f"{strategy}: {out[strategy]['reached']}/27 on test (n = 96/93/96), "
          f"{out[strategy]['reached_validation']}/27 on validation, {report['exact_evaluations']} evaluations")
(HERE / "strategies_test.json").write_text(json.dumps({"split": "test", "new_test_evaluations": test.count,
                                                      "strategies": out}, indent=2))
