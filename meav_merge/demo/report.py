"""The evaluation steps and the markdown report of ``meav demo``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict

from meav_merge.data.schema import levels_for, load_records
from meav_merge.evaluation.tables import format_wide_table, ood_table, plot_sweep, table1 as table1_rows
from meav_merge.io.rows import write_rows_csv
from meav_merge.evaluation.scoring import dominant
from meav_merge.evaluation.sweep import ReweightableModel, format_table, sweep, write_sweep
from meav_merge.vectors.alignment_vector import AlignmentVector
from meav_merge.training.composed import ComposedTrainConfig


log = logging.getLogger(__name__)

# What yaml_recipes/insurance.yaml is for (the MEAV paper's motivating example).
INSURANCE_TARGET = {"legal": "expert", "financial": "generic", "medical": "avoidance"}


class Session:
    """The demo's evaluation model: the target with every domain's vector, loaded on first use
    and shared by the sweeps, the out-of-domain table and Table 1, so frozen-layer states and
    scores they have in common (λ = 0, the MEAV rows) are computed once."""

    def __init__(self, cfg, vectors: Dict[str, Path]):
        self.cfg, self.vectors, self._rm = cfg, dict(vectors), None

    @property
    def rm(self) -> ReweightableModel:
        if self._rm is None:
            self._rm = ReweightableModel(self.cfg.model_dir, [AlignmentVector.load(p) for p in self.vectors.values()])
        return self._rm

    def direction(self, domain: str) -> list:
        return [1.0 if d == domain else 0.0 for d in self.vectors]


def sweeps(session: Session, report: Path) -> dict:
    cfg, out = session.cfg, {}
    for domain, vec in session.vectors.items():
        recs = load_records(cfg.data, domain, "test")[: cfg.queries]
        points = sweep(session.rm, recs, list(cfg.lambdas), directions=[session.direction(domain)],
                       desc=f"sweep {domain}")
        meta = {"domain": domain, "vector": str(vec), "queries": len(recs)}
        summary = write_sweep(report, f"sweep_{domain}", list(cfg.lambdas), points, meta)
        plot_sweep(list(cfg.lambdas), points, report / f"sweep_{domain}.png",
                   f"{domain}: preference accuracy vs λ ({len(recs)} test queries)")
        log.info("\n%s\n%s", domain, format_table(list(cfg.lambdas), points))
        # λ per level for Table 1 and the OOD table: the smallest |λ| at which the level is
        # dominant (else where its share is highest). Large |λ| wins on preference accuracy
        # but breaks greedy generation of CPU-preset vectors (|λ| ≥ 2 gives repeated tokens).
        best = {}
        for lv in levels_for(domain):
            won = [lam for lam, p in zip(cfg.lambdas, points) if p.dominant == lv]
            best[lv] = (min(won, key=abs) if won else
                        max(zip(cfg.lambdas, points), key=lambda lp: (lp[1].fractions[lv], -abs(lp[0])))[0])
        out[domain] = {"points": summary["points"], "ranges": summary["dominance_ranges"], "best_lambda": best}
    return out


def ood(session: Session, medical_sweep: dict, report: Path) -> dict:
    """The medical vector at λ = 0 and at each medical level's λ from the sweep (paper Table 2)."""
    cfg = session.cfg
    lambdas = list(dict.fromkeys([0.0, *medical_sweep["best_lambda"].values()]))
    rows = ood_table(session.rm, lambdas, str(cfg.data), ["financial", "legal", "safety", "helpfulness"],
                     limit=cfg.queries, direction=session.direction("medical"))
    write_rows_csv(rows, report / "ood_medical.csv")
    log.info("\nout-of-domain effect of the medical vector\n%s", format_wide_table(rows))
    return {"rows": rows}


def table1(session: Session, medical_sweep: dict, report: Path) -> dict:
    from meav_merge.evaluation.level_classifier import default_classifier

    cfg = session.cfg
    recs = load_records(cfg.data, "medical", "test")[: cfg.queries]
    judge = default_classifier(str(cfg.data))
    lams = {lv: lam for lv, lam in medical_sweep["best_lambda"].items()}
    rows = table1_rows(session.rm, recs, lams, judge=judge, max_new_tokens=cfg.max_new_tokens,
                       judged_limit=cfg.judged_answers, direction=session.direction("medical"))
    write_rows_csv(rows, report / "table1_medical.csv")
    log.info("\nTable 1 (medical)\n%s", format_wide_table(rows, first="technique"))
    return {"rows": rows, "judge_heldout_accuracy": judge.heldout}


def _md_table(rows, first: str) -> str:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(out)


def write_report(cfg, report: Path, lm: dict, sweeps_: dict, ood_: dict, t1: dict, pipes) -> Path:
    lines = [
        "# MEAV demo report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `meav demo` on the embedded SmolLM2-135M-Instruct. "
        f"Preference accuracy = share of queries whose highest token-mean log-probability response is at each "
        f"level (MEAV paper Eq. 4). Sweeps and tables use the first {cfg.queries} test queries "
        f"per domain (`meav demo --queries 32` for the whole test split), the insurance lm-eval run the first "
        f"{cfg.insurance_queries} (`--insurance-queries`).",
        "",
        "## The insurance model (legal expert, financial generic, medical avoidance)",
        "",
        f"Recipe `{cfg.recipe}` merged with plain `mergekit-yaml` into `{cfg.out / 'insurance'}` and scored with "
        "plain `lm_eval --tasks meav_pref`. Its vectors are the composed ones in "
        f"`{cfg.runs / 'composed'}` (`meav train-composed`; unless vectors trained with these settings exist, "
        f"the demo trains them for {cfg.composed_steps} steps at learning rate {cfg.composed_lr:g}, "
        f"fluency weight {ComposedTrainConfig.fluency_weight:g}"
        + (f" on the first {cfg.composed_records} train records per domain" if cfg.composed_records else "")
        + "):",
        "",
        "| task | n | pref_acc_exp | pref_acc_gen | pref_acc_avd | level | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, m in sorted(lm["results"].items()):
        if "pref_acc_exp" in m:
            fr = {"expert": m["pref_acc_exp"], "generic": m["pref_acc_gen"], "avoidance": m["pref_acc_avd"]}
            level = dominant(fr) or "none"
            target = INSURANCE_TARGET.get(task.rsplit("_", 1)[-1], "")
            mark = (" ✓" if level == target else " ✗") if target else ""
            lines.append(f"| {task} | {m.get('n') or '–'} | {fr['expert']:.2f} | {fr['generic']:.2f} | "
                         f"{fr['avoidance']:.2f} | {level} | {target}{mark} |")
    lines += ["", "## λ sweeps (paper Figure 2)", "",
              "The vectors trained one domain at a time (`meav train`, "
              f"{cfg.train_records} train records per domain"
              + (f"; {', '.join(cfg.rpo_domains)} with the RPO anchor, `--sft-weight 1`" if cfg.rpo_domains else "")
              + "), each over the base model.", ""]
    for domain, s in sweeps_.items():
        ranges = ", ".join(f"{r['level']} for λ ∈ [{r['from']:+.1f}, {r['to']:+.1f}]" for r in s["ranges"]) or "none"
        lines += [f"### {domain}", "", f"![{domain} sweep](sweep_{domain}.png)", "", f"Dominant: {ranges}.", ""]
    lines += ["## Out-of-domain effect of the medical vector (paper Table 2)", "", _md_table(ood_["rows"], "lambda"), ""]
    acc = t1.get("judge_heldout_accuracy", {})
    lines += ["## Default vs prompting vs MEAV, medical (paper Table 1)", "",
              "`pref:` preference accuracy; `judged:` judged generation accuracy (greedy answers classified by the "
              f"offline level classifier, whose held-out accuracy is {acc.get('overall', float('nan')):.2f}).", "",
              _md_table(t1["rows"], "technique"), "",
              "## Step timings", ""]
    for pipe in pipes:
        for name, st in pipe.state.items():
            when = ("existing vector" if st.get("result", {}).get("trained") is False else
                    "this run" if name in pipe.timings else f"an earlier run, kept in {pipe.state_file.parent}")
            lines.append(f"- {name}: {st.get('seconds', 0)} s ({when})")
    path = report / "README.md"
    path.write_text("\n".join(lines) + "\n")
    (report / "summary.json").write_text(json.dumps({"lm_eval": lm["results"], "sweeps": sweeps_, "ood": ood_,
                                                     "table1": t1}, indent=2, default=str))
    return path
