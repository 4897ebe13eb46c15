"""Greedy samples of every shipped recipe, with their judged level and fluency (README, issue 19).

Each recipe is merged by plain ``mergekit-yaml`` and answered with ``meav judge`` (offline
level classifier; ``--reference`` the base model, whose log-prob of the answer flags word
salad; distinct-2 flags loops), on the first test queries of the domains it steers. The
base model answers the same queries for scale. Run from the repository root after
``make demo`` (the recipes read ``runs/<domain>/vector``):

    .venv/bin/python scripts/recipe_samples.py --out docs/results/recipe_samples

Writes ``<out>/<recipe>/<domain>/{answers.jsonl,judged.json}``, ``summary.json`` and
``samples.md`` (the README quotes it). ``--recipe-file FILE --domains a,b`` samples a recipe that
is not shipped (named by the file's stem), e.g. one λ point of a study. A recipe whose inputs are
missing is skipped with the reason, so a partial set of vectors still gives a partial report.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models" / "smollm2-135m-instruct"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# which domains' queries each recipe is judged on: the ones it steers (plus safety for transfer)
RECIPES = {
    "medical_expert": ["medical"],
    "medical_generic": ["medical"],
    "medical_avoidance": ["medical"],
    "insurance": ["legal", "financial", "medical"],
    "transfer_safety_target": ["medical"],
    "transfer_from_checkpoint": ["legal"],
    "helpful_harmless_pv": ["helpfulness"],
}


def _missing_inputs(recipe: Path) -> list:
    spec = yaml.safe_load(recipe.read_text())
    paths = [spec["base_model"]] + [m["model"] for m in spec["models"]]
    paths += [m.get("parameters", {}).get("unaligned") for m in spec["models"]]
    return [p for p in paths if p and not (ROOT / p).exists()]


def _judge(model: Path, domain: str, out: Path, args) -> dict:
    subprocess.run([str(BIN / "meav"), "judge", "--model", str(model), "--reference", str(BASE), "--domain", domain,
                    "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens), "--out", str(out), "--force",
                    "--repetition-penalty", str(args.repetition_penalty)],
                   check=True, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL)
    judged = json.loads((out / "judged.json").read_text())
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    return {"levels": {lv: judged[lv] for lv in ("expert", "generic", "avoidance") if lv in judged},
            "n": judged["n"], "fluency": judged["fluency"], "answers": answers}


def _resolved_lambdas(merged: Path) -> list:
    """The card's vector table rows: each vector with its λ (and the level it was resolved from)."""
    lines = (merged / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| vector | λ |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(" | ".join(cell.strip() for cell in line.strip("|").split("|")[:2]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "recipe_samples")
    ap.add_argument("--n", type=int, default=3, help="test queries per domain")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0: plain greedy decoding")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    ap.add_argument("--recipe-file", type=Path, help="sample this recipe file instead (needs --domains)")
    ap.add_argument("--domains", help="comma-separated domains to judge --recipe-file's merge on")
    args = ap.parse_args()
    if (args.recipe_file is None) != (args.domains is None):
        ap.error("--recipe-file and --domains go together")
    if args.recipe_file:
        recipes = {args.recipe_file.stem: (args.recipe_file.resolve(), args.domains.split(","))}
    else:
        recipes = {name: (ROOT / "yaml_recipes" / f"{name}.yaml", RECIPES[name]) for name in args.recipes.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"n": args.n, "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty,
               "recipes": {}, "base": {}}
    previous = args.out / "summary.json"
    if previous.is_file():  # a rerun of some recipes keeps the others' results (same settings only)
        old = json.loads(previous.read_text())
        if all(old.get(k) == summary[k] for k in ("n", "max_new_tokens", "repetition_penalty")):
            summary["recipes"], summary["base"] = old["recipes"], old["base"]
    base_domains = sorted({d for _, domains in recipes.values() for d in domains})
    summary["base"].update({d: _judge(BASE, d, args.out / "base" / d, args) for d in base_domains
                            if d not in summary["base"]})
    for name, (recipe, domains) in recipes.items():
        missing = _missing_inputs(recipe)
        if missing:
            summary["recipes"][name] = {"skipped": f"missing {', '.join(missing)}"}
            print(f"{name}: skipped (missing {', '.join(missing)})")
            continue
        with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
            merged = Path(tmp) / name
            subprocess.run([str(BIN / "mergekit-yaml"), str(recipe), str(merged)], check=True, cwd=ROOT, env=ENV,
                           capture_output=True)
            result = {"card_lambdas": _resolved_lambdas(merged),
                      "domains": {d: _judge(merged, d, args.out / name / d, args) for d in domains}}
        summary["recipes"][name] = result
        flu = {d: round(r["fluency"]["distinct_2"], 2) for d, r in result["domains"].items()}
        print(f"{name}: distinct-2 {flu}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    (args.out / "samples.md").write_text(_markdown(summary))
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'samples.md'}")


def _row(label: str, r: dict) -> str:
    f = r["fluency"]
    lv = " / ".join(f"{r['levels'].get(k, 0):.2f}" for k in ("expert", "generic", "avoidance"))
    return f"| {label} | {lv} | {f['distinct_2']:.2f} | {f['reference_logprob']:.2f} |"


def _markdown(summary: dict) -> str:
    n = summary["n"]
    rp = summary["repetition_penalty"]
    decoding = "plain greedy decoding" if rp == 1.0 else f"greedy decoding with repetition penalty {rp:g}"
    lines = [f"# Samples of the shipped recipes: {decoding} (first {n} test queries per domain, "
             f"{summary['max_new_tokens']} new tokens at most)", "",
             "Judged level: the offline level classifier (expert / generic / avoidance fractions, n = "
             f"{n}). distinct-2: unique word bigrams / bigrams (1.0 = no repeats). log-prob: mean "
             "token log-prob of the answer under the unsteered base model (word salad scores far "
             "below the base's own answers).", "",
             "| model, domain | judged exp / gen / avd | distinct-2 | base log-prob |", "|---|---|---|---|"]
    for d, r in summary["base"].items():
        lines.append(_row(f"base model, {d}", r))
    for name, res in summary["recipes"].items():
        if "skipped" in res:
            lines.append(f"| {name} | skipped: {res['skipped']} | | |")
            continue
        for d, r in res["domains"].items():
            lines.append(_row(f"{name}, {d}", r))
    for name, res in summary["recipes"].items():
        if "skipped" in res:
            continue
        lines += ["", f"## {name}", ""]
        for d, r in res["domains"].items():
            for a in r["answers"]:
                lines.append(f"- **{d}** — *{a['query'][:120]}* → [{a['label']}] {a['answer']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
