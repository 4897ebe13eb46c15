"""The evaluation section of a merged model's card, from lm-eval's output (``meav card --results``).

lm-eval writes ``OUT/<model>/results_<timestamp>.json``; a reader should not have to dig
that path out, so a folder is accepted and its newest results file used. The section lists
metrics only (lm-eval also stores ``alias``, ``sample_len``, stderr keys and counts), gives
each row its n, marks partial runs (``--limit``) as such, and puts an arrow only where a
direction is meaningful: a level fraction is neither good nor bad until a recipe says which
level it wants (``pref_acc_target`` is that fraction).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Tuple

from meav_merge.coefficients import is_finite_number

EVAL_BEGIN = "<!-- meav:eval:begin -->"
EVAL_END = "<!-- meav:eval:end -->"

# Fractions of queries won by one level: which level is better depends on the recipe.
_NO_DIRECTION = re.compile(r"^(pref_acc|gen_acc)_(exp|gen|avd|safe|unsafe|helpful|unhelpful)$|^judge_confidence$")
_NOT_METRICS = {"alias", "name", "sample_len", "sample_count", "samples"}


def load_results(path: str | Path) -> Tuple[dict, Path]:
    """(results, file) from an lm-eval results JSON or an ``--output_path`` folder (newest file in it)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("results_*.json"), key=lambda p: (p.name, p.stat().st_mtime))
        if not found:
            raise FileNotFoundError(f"{path}: no lm-eval results_*.json in this folder or below "
                                    f"(lm_eval writes them under --output_path)")
        path = found[-1]  # names carry lm-eval's timestamp, so the last is the newest run
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read lm-eval results ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a JSON file ({str(e).splitlines()[0]})") from None
    table = data.get("results", data) if isinstance(data, dict) else None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{path}: not an lm-eval results file (expected a 'results' mapping of task -> metrics)")
    return data, path


def add_eval_results(model_dir: str | Path, results: dict | str | Path) -> Path:
    """Replace the card's evaluation section with the metrics of ``results`` (a dict, a file or a folder)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model directory")
    source = None
    if not isinstance(results, dict):
        results, source = load_results(results)
    card = model_dir / "README.md"
    text = card.read_text() if card.is_file() else ""
    block = "\n".join([EVAL_BEGIN, *evaluation_lines(results, source), EVAL_END])
    if EVAL_BEGIN in text and EVAL_END in text:
        text = re.sub(re.escape(EVAL_BEGIN) + ".*?" + re.escape(EVAL_END), lambda _: block, text, flags=re.S)
    else:
        text = text + "\n## Evaluation\n\n" + block + "\n"
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(text)
    tmp.replace(card)
    return card


def evaluation_lines(results: dict, source: Optional[Path] = None) -> list:
    """Markdown for the evaluation section: where the numbers come from, then one row per metric."""
    table = results.get("results", results)
    rows, partial = [], []
    for task in sorted(table):
        n, total = _counts(results, task)
        if total is not None and n is not None and n < total:
            partial.append(task)
        for metric, value in _metrics(results, task):
            stderr = table[task].get(f"{metric}_stderr,{_filter(table[task], metric)}")
            rows.append(f"| {task} | {metric}{_arrow(results, task, metric)} | {_num(value)} | {_num(stderr)} "
                        f"| {_n_cell(n, total)} |")
    lines = [_source_line(results, source), ""] if source or results.get("lm_eval_version") else []
    if partial:
        limit = (results.get("config") or {}).get("limit")
        limit = f" (lm-eval `--limit {limit:g}`)" if isinstance(limit, (int, float)) else ""
        lines += [f"**Partial run**{limit}: "
                  f"{', '.join(partial)} scored only the first n of their queries (n column); these numbers "
                  "are not the full test-split result.", ""]
    lines += ["Preference accuracy: the fraction of queries whose highest token-mean log-probability response "
              "is at each level. ↑ marks metrics where higher is better; a level's fraction has no arrow, "
              "since which level is wanted depends on the recipe (`pref_acc_target` is the fraction at the "
              "level asked for).", "",
              "| task | metric | value | ± stderr | n |", "|---|---|---|---|---|", *rows]
    return lines


def _metrics(results: dict, task: str):
    """(name, value) of the task's metrics: those lm-eval lists in higher_is_better, else every
    numeric `metric,filter` key that is not a stderr."""
    entry = results.get("results", results)[task]
    listed = (results.get("higher_is_better") or {}).get(task)
    for key, value in sorted(entry.items()):
        name = key.split(",")[0]
        if name in _NOT_METRICS or name.endswith("_stderr") or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or (listed is not None and name not in listed):
            continue
        yield name, value


def _filter(entry: dict, metric: str) -> str:
    key = next((k for k in entry if k.split(",")[0] == metric), metric)
    return key.split(",", 1)[1] if "," in key else "none"


def _arrow(results: dict, task: str, metric: str) -> str:
    if _NO_DIRECTION.match(metric):
        return ""
    better = ((results.get("higher_is_better") or {}).get(task) or {}).get(metric)
    return {True: " ↑", False: " ↓"}.get(better, "")


def _counts(results: dict, task: str) -> Tuple[Optional[int], Optional[int]]:
    """(queries scored, queries in the split) for a task or a group of tasks."""
    samples = results.get("n-samples") or {}
    if task in samples:
        return samples[task].get("effective"), samples[task].get("original")
    subtasks = (results.get("group_subtasks") or {}).get(task) or []
    if subtasks and all(t in samples for t in subtasks):
        return (sum(samples[t].get("effective") or 0 for t in subtasks),
                sum(samples[t].get("original") or 0 for t in subtasks))
    n = results.get("results", results)[task].get("sample_len")
    return (n if isinstance(n, int) else None), None


def _n_cell(n: Optional[int], total: Optional[int]) -> str:
    if n is None:
        return "–"
    if total is not None and n < total:
        return f"{n} of {total} (partial)"
    return str(n)


def _num(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"  # lm-eval writes "N/A" for a stderr it could not compute
    return f"{value:.3f}" if is_finite_number(value) else str(value)


def _source_line(results: dict, source: Optional[Path]) -> str:
    parts = []
    if source is not None:
        parts.append(f"`{source.name}`")
    if results.get("lm_eval_version"):
        parts.append(f"lm-eval {results['lm_eval_version']}")
    date = results.get("date")
    if is_finite_number(date):
        try:
            parts.append(datetime.fromtimestamp(date, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        except (OverflowError, OSError, ValueError):  # a date past what a timestamp can hold: leave it out
            pass
    return "Results from " + ", ".join(parts) + "."
