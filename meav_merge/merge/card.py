"""Hugging Face model cards for ``meav`` merges.

mergekit writes README.md through ``mergekit.card.generate_card``; for ``meav``
recipes the plugin routes that call here, so plain ``mergekit-yaml`` output carries
every vector's λ and provenance. ``add_eval_results`` later fills the evaluation
section (``meav card --results``). No Hub lookups are made.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import yaml

from meav_merge.vectors.alignment_vector import META_NAME

EVAL_BEGIN = "<!-- meav:eval:begin -->"
EVAL_END = "<!-- meav:eval:end -->"

WARNING = (
    "Alignment vectors are signed knobs: the same vector that makes a model more careful can, with a "
    "negative λ, remove that care. Vectors can undo safety alignment (a negative safety λ, or a domain "
    "vector pushed far past its trained range). Evaluate a merged model for safety before deploying it, "
    "do not publish merges built to strip safeguards, and keep the recipe with the model so others can "
    "see how it was made. Expert-level answers from a 135M-parameter model are not professional advice."
)


def _entries(config):
    """(path, parameters) of each non-base entry, whatever recipe syntax was used."""
    base = config.base_model.model.path if config.base_model else None
    rows = []
    for m in config.models or []:
        rows.append((m.model.model.path, dict(m.parameters or {})))
    for s in config.slices or []:
        for src in s.sources:
            rows.append((src.model.model.path, dict(src.parameters or {})))
    for mod in (config.modules or {}).values():
        for m in mod.models or []:
            rows.append((m.model.model.path, dict(m.parameters or {})))
        for s in mod.slices or []:
            for src in s.sources:
                rows.append((src.model.model.path, dict(src.parameters or {})))
    seen, out = set(), []
    for path, params in rows:
        if path == base or path in seen:
            continue
        seen.add(path)
        merged = {**(config.parameters or {}), **params}
        out.append((path, merged))
    return out


def _provenance(path: str) -> dict:
    meta_file = Path(path) / META_NAME
    if meta_file.is_file():
        try:
            return json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _lambda_cell(path, lam) -> str:
    from meav_merge.merge.method import RESOLVED_LEVELS

    level = RESOLVED_LEVELS.get(str(path))  # the recipe said `level:`; validate_recipe resolved it
    if level:
        return f"{_fmt(level[1])} (level: {level[0]}, from the vector's calibration)"
    return _fmt(lam)


def _fmt(value) -> str:
    if value is None or value == "":
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-")


def output_name(name: Optional[str]) -> str:
    """The output's name: mergekit passes the directory it writes, which for ``meav merge``
    is the hidden temp sibling ``.OUT.tmp-...`` that is renamed to OUT at the end."""
    m = _TEMP_NAME.match(name or "")
    return (m["name"] if m else name) or "meav-merge"


def merge_card(config, config_yaml: Optional[str] = None, name: Optional[str] = None, **_ignored) -> str:
    if config_yaml:
        # mergekit normalizes the config in place while planning (models -> module
        # slices); the recipe text is the faithful record of what the user wrote.
        from mergekit.config import MergeConfiguration

        config = MergeConfiguration.model_validate(yaml.safe_load(config_yaml))
    else:
        config_yaml = config.to_yaml()
    name = output_name(name)
    base = config.base_model.model.path if config.base_model else "?"
    entries = _entries(config)
    metas = [(_provenance(p), p, params) for p, params in entries]

    front = {
        "library_name": "transformers",
        "tags": ["merge", "mergekit", "meav", "alignment-vectors"],
        "base_model": [base],
    }
    rows = []
    for meta, path, params in metas:
        training = meta.get("training") or {}
        data = training.get("data") or {}
        rows.append(
            "| {path} | {lam} | {kind} | {domain} | {pref} | {fp} | {data} | {train} |".format(
                path=_fmt(path),
                lam=_lambda_cell(path, params.get("lambda")),
                kind=_fmt(meta.get("kind") or ("checkpoint − " + str(params.get("unaligned")) if params.get("unaligned") else "?")),
                domain=_fmt(meta.get("domain")),
                pref=_fmt(meta.get("preference")),
                fp=_fmt(meta.get("base_fingerprint")),
                data=_fmt(data.get("file_sha256", "")[:19] if data.get("file_sha256") else data.get("file")),
                train=_fmt(", ".join(f"{k}={training[k]}" for k in ("loss_type", "beta", "learning_rate", "epochs", "train_scope") if k in training)),
            )
        )
    transfer = [p for _, p, params in metas if params.get("transfer") or params.get("unaligned")]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {name}",
        "",
        "A model edited with **MEAV** (Model Editing with Alignment Vectors) using "
        "[meav_merge](https://github.com/meav-merge/meav_merge) and [mergekit](https://github.com/arcee-ai/mergekit):",
        "",
        "θ = θ_target + Σ λ_i · AV_i,  AV_i = θ_aligned,i − θ_unaligned",
        "",
        f"Target model (θ_target): `{base}`",
        "",
        "## Alignment vectors",
        "",
        "| vector | λ | kind | domain | preference | base fingerprint | data | training |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "λ > 0 moves a domain toward the preferred responses the vector was trained on (expert), "
        "λ < 0 toward the dispreferred ones (avoidance); values in between give generic behaviour.",
    ]
    if transfer:
        lines += ["", "Transferred vectors (measured from a model other than the target): "
                  + ", ".join(f"`{p}`" for p in transfer) + "."]
    lines += [
        "",
        "## Evaluation",
        "",
        EVAL_BEGIN,
        "No evaluation recorded yet. Run `lm_eval --model hf --model_args pretrained=<this dir> --tasks meav_pref` "
        "and `meav card --results <results.json> <this dir>` to add it here.",
        EVAL_END,
        "",
        "## Intended use",
        "",
        "Research and prototyping of inference-time preference control: choosing how specialised a model's "
        "answers are per domain (expert, generic, or avoidance) without retraining.",
        "",
        "## Misuse and limitations",
        "",
        WARNING,
        "",
        "## Recipe",
        "",
        "Reproduce with `mergekit-yaml recipe.yaml OUT` (with meav_merge installed):",
        "",
        "```yaml",
        config_yaml.strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def add_eval_results(model_dir: str | Path, results: dict) -> Path:
    """Replace the card's evaluation section with a table of lm-eval style results."""
    card = Path(model_dir) / "README.md"
    text = card.read_text() if card.is_file() else ""
    table = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in sorted((results.get("results") or results).items()):
        for metric, value in sorted(metrics.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
                table.append(f"| {task} | {metric.split(',')[0]} | {value:.3f} |")
    block = "\n".join([EVAL_BEGIN, "Preference accuracy (fraction of test queries whose highest token-mean "
                       "log-probability response is at each level):", "", *table, EVAL_END])
    if EVAL_BEGIN in text and EVAL_END in text:
        text = re.sub(re.escape(EVAL_BEGIN) + ".*?" + re.escape(EVAL_END), lambda _: block, text, flags=re.S)
    else:
        text = text + "\n## Evaluation\n\n" + block + "\n"
    tmp = card.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(card)
    return card
