"""Hugging Face model cards for ``meav`` merges.

mergekit writes README.md through ``mergekit.card.generate_card``; for ``meav``
recipes the plugin routes that call here, so plain ``mergekit-yaml`` output carries
every vector's λ and provenance. ``card_results.add_eval_results`` later fills the
evaluation section (``meav card --results``). No Hub lookups are made.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import yaml

from meav_merge.io.base_model import BASE_RECORD  # the Hub name `meav base` records
from meav_merge.merge.card_results import EVAL_BEGIN, EVAL_END
from meav_merge.vectors.alignment_vector import META_NAME

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
    """The README.md of a ``meav`` merge (mergekit's ``generate_card`` signature)."""
    config, config_yaml = _recipe(config, config_yaml)
    base = config.base_model.model.path if config.base_model else None
    vectors = [(_provenance(p), p, params) for p, params in _entries(config)]
    base_name = recorded_base_name(base, [meta for meta, _, _ in vectors]) if base else None
    lines = [
        "---", yaml.safe_dump(_front_matter(base_name), sort_keys=False).strip(), "---",
        f"# {output_name(name)}",
        "",
        *_introduction(base, base_name),
        *_vector_section(vectors),
        *_evaluation_placeholder(),
        *_use_and_misuse(),
        *_recipe_section(config_yaml),
    ]
    return "\n".join(lines)


def _recipe(config, config_yaml: Optional[str]):
    if config_yaml:
        # mergekit normalizes the config in place while planning (models -> module
        # slices); the recipe text is the faithful record of what the user wrote.
        from mergekit.config import MergeConfiguration

        return MergeConfiguration.model_validate(yaml.safe_load(config_yaml)), config_yaml
    return config, config.to_yaml()


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/")


def recorded_base_name(base: str, metas: list) -> Optional[str]:
    """A name a reader can resolve on the Hub for the target model, if one was recorded.

    Looked for, in order: the vectors' ``base_model_name``, the base folder's
    ``meav_base.json`` (written by ``meav base``), a Hugging Face cache snapshot path,
    and the config's ``_name_or_path``. A bare local path is never returned: on the Hub
    it resolves to nothing, so the card keeps it under provenance instead.
    """
    for meta in metas:
        if _HUB_ID.match(str(meta.get("base_model_name") or "")):
            return meta["base_model_name"]
    record = _read_json(Path(base) / BASE_RECORD)
    if _HUB_ID.match(str(record.get("name") or "")):
        return record["name"]
    m = _HF_CACHE.search(str(Path(base).resolve()).replace("\\", "/"))
    if m:
        return f"{m['org']}/{m['name']}"
    recorded = str(_read_json(Path(base) / "config.json").get("_name_or_path") or "")
    if _HUB_ID.match(recorded) and not Path(recorded).exists():
        return recorded
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _front_matter(base_name: Optional[str]) -> dict:
    front = {"library_name": "transformers", "tags": ["merge", "mergekit", "meav", "alignment-vectors"]}
    if base_name:
        front["base_model"] = [base_name]
    return front


def _introduction(base: Optional[str], base_name: Optional[str]) -> list:
    return [
        "A model edited with **MEAV** (Model Editing with Alignment Vectors) using "
        "[meav_merge](https://github.com/meav-merge/meav_merge) and [mergekit](https://github.com/arcee-ai/mergekit):",
        "",
        "θ = θ_target + Σ λ_i · AV_i,  AV_i = θ_aligned,i − θ_unaligned",
        "",
        f"Target model (θ_target): {_target(base, base_name)}",
        "",
    ]


def _target(base: Optional[str], base_name: Optional[str]) -> str:
    if base is None:
        return "?"
    from meav_merge.io.checkpoint import CheckpointError, fingerprint

    try:
        fp = fingerprint(base)
    except (CheckpointError, OSError, ValueError):
        fp = None
    local = f"local path `{base}`" + (f", fingerprint {fp}" if fp else "")
    if base_name:
        return f"`{base_name}` (provenance: {local})"
    return f"`{base}` (provenance: {local}; no Hub name was recorded for it)"


def _vector_section(vectors: list) -> list:
    lines = [
        "## Alignment vectors",
        "",
        "| vector | λ | kind | domain | preference | base fingerprint | data | training |",
        "|---|---|---|---|---|---|---|---|",
        *(_vector_row(meta, path, params) for meta, path, params in vectors),
        "",
        "λ > 0 moves a domain toward the preferred responses the vector was trained on (expert), "
        "λ < 0 toward the dispreferred ones (avoidance); values in between give generic behaviour.",
    ]
    transfer = [p for _, p, params in vectors if params.get("transfer") or params.get("unaligned")]
    if transfer:
        lines += ["", "Transferred vectors (measured from a model other than the target): "
                  + ", ".join(f"`{p}`" for p in transfer) + "."]
    return lines + [""]


def _vector_row(meta: dict, path: str, params: dict) -> str:
    training = meta.get("training") or {}
    data = training.get("data") or {}
    kind = meta.get("kind") or ("checkpoint − " + str(params.get("unaligned")) if params.get("unaligned") else "?")
    keys = ("loss_type", "beta", "learning_rate", "epochs", "train_scope")
    cells = [
        _fmt(path), _lambda_cell(path, params.get("lambda")), _fmt(kind), _fmt(meta.get("domain")),
        _fmt(meta.get("preference")), _fmt(meta.get("base_fingerprint")),
        _fmt(data.get("file_sha256", "")[:19] if data.get("file_sha256") else data.get("file")),
        _fmt(", ".join(f"{k}={training[k]}" for k in keys if k in training)),
    ]
    return "| " + " | ".join(cells) + " |"


def _evaluation_placeholder() -> list:
    return [
        "## Evaluation",
        "",
        EVAL_BEGIN,
        "No evaluation recorded yet. Run `lm_eval --model hf --model_args pretrained=<this dir> --tasks meav_pref "
        "--output_path <results dir>` and `meav card <this dir> --results <results dir>` to add it here.",
        EVAL_END,
        "",
    ]


def _use_and_misuse() -> list:
    return [
        "## Intended use",
        "",
        "Research and prototyping of inference-time preference control: choosing how specialised a model's "
        "answers are per domain (expert, generic, or avoidance) without retraining.",
        "",
        "## Misuse and limitations",
        "",
        WARNING,
        "",
    ]


def _recipe_section(config_yaml: str) -> list:
    return [
        "## Recipe",
        "",
        "Reproduce with `mergekit-yaml recipe.yaml OUT` (with meav_merge installed):",
        "",
        "```yaml",
        config_yaml.strip(),
        "```",
        "",
    ]
