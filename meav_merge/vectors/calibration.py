"""Vectors that know their levels: the λ at which each level is dominant, kept in the vector's metadata.

A CPU-preset vector may need λ = +2 for expert answers and −4 for avoidance, a
full-model one +0.5 and −1.2: the number alone says nothing. ``calibrate`` sweeps λ on
a split the vector was not trained on and records, per level, the smallest |λ| at which
that level is dominant (highest fraction and above 1/3), with its fraction, the split and
n. A recipe entry can then say ``level: generic`` and the merge resolves it (``resolve_level``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from meav_merge.vectors.alignment_vector import META_NAME, VectorError

DEFAULT_LAMBDAS = (-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def _by_magnitude(lambdas: Sequence[float]) -> list:
    """λ in the order the calibration needs them: smallest |λ| first (the negative one first on a tie)."""
    return sorted(dict.fromkeys(float(x) for x in lambdas), key=lambda x: (abs(x), x))


def _smallest_per_level(lambdas: Sequence[float], points, levels: Sequence[str]) -> dict:
    found = {}
    for lam, p in sorted(zip(lambdas, points), key=lambda t: (abs(t[0]), t[0])):
        d = p.dominant
        if d is not None and d not in found:
            found[d] = {"lambda": float(lam), "fraction": round(float(p.fractions[d]), 4)}
    return {lv: found.get(lv) for lv in levels}


def _sweep_until_found(rm, records, lambdas: Sequence[float], desc: str):
    """Evaluate λ by growing |λ| and stop once every level has been dominant somewhere.

    Only the smallest |λ| per level is recorded, so the points past that would change
    nothing; skipping them halves a typical calibration (avoidance often needs the
    largest |λ|, expert and generic are found early, or the reverse)."""
    from tqdm.auto import tqdm

    from meav_merge.evaluation.scoring import prepare
    from meav_merge.evaluation.sweep import evaluate_point

    levels = records[0].levels
    prepared = prepare(rm.tokenizer, records, levels=levels)
    done, points, seen = [], [], set()
    order = _by_magnitude(lambdas)
    for lam in tqdm(order, desc=desc, unit="λ"):
        p = evaluate_point(rm, [lam], prepared, levels)
        done.append(lam)
        points.append(p)
        if p.dominant:
            seen.add(p.dominant)
        if seen >= set(levels):
            break
    return done, points


def write_calibration(vector_dir: str | os.PathLike, calibration: dict) -> Path:
    """Add ``calibration`` to meav_vector.json (temp file + rename: the metadata is never half-written)."""
    meta_file = Path(vector_dir) / META_NAME
    meta = json.loads(meta_file.read_text())
    meta["calibration"] = calibration
    tmp = meta_file.with_name(f".{META_NAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_file)
    return meta_file


def calibrate(vector_dir: str | os.PathLike, model_dir: str | os.PathLike, data: str | os.PathLike,
              domain: Optional[str] = None, split: str = "validation", lambdas: Sequence[float] = DEFAULT_LAMBDAS,
              limit: Optional[int] = None, transfer: bool = False) -> dict:
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.vectors.alignment_vector import AlignmentVector

    vec = AlignmentVector.load(vector_dir)
    domain = domain or vec.meta.get("domain")
    if not domain or domain == "joint":
        raise VectorError(f"{vector_dir}: give --domain (the vector does not record a single domain)")
    records = load_records(data, domain, split)[: limit or None]
    if not records:
        raise VectorError(f"{data}: no {domain} records in split '{split}' to calibrate on")
    rm = ReweightableModel(model_dir, [vec], transfer=transfer)
    done, points = _sweep_until_found(rm, records, lambdas, desc=f"calibrate {domain}")
    calibration = {"domain": domain, "split": split, "n": len(records), "model": str(model_dir),
                   "lambdas": [float(x) for x in lambdas],
                   "levels": _smallest_per_level(done, points, records[0].levels),
                   "sweep": [{"lambda": lam, "fractions": p.fractions} for lam, p in zip(done, points)]}
    write_calibration(vector_dir, calibration)
    return calibration


def resolve_level(meta: dict, level: str, where: str) -> float:
    """The calibrated λ of ``level``; a one-line error naming ``where`` when there is none."""
    cal = meta.get("calibration")
    if not cal:
        raise VectorError(f"{where}: `level: {level}` needs a calibrated vector; run `meav calibrate VECTOR` "
                          "or give `lambda`")
    levels = cal.get("levels", {})
    if level not in levels:
        raise VectorError(f"{where}: level '{level}' is not one of this vector's levels ({', '.join(levels)})")
    if levels[level] is None:
        raise VectorError(f"{where}: level '{level}' was never dominant in calibration (λ in "
                          f"[{min(cal['lambdas']):g}, {max(cal['lambdas']):g}] on {cal['split']}, n={cal['n']}); "
                          "give `lambda` instead")
    return float(levels[level]["lambda"])


def describe(vector_dir: str | os.PathLike) -> str:
    """``meav vector info``: provenance, norms and calibration, as text."""
    from meav_merge.vectors.alignment_vector import AlignmentVector

    vec = AlignmentVector.load(vector_dir)
    meta = vec.meta
    train = meta.get("training", {})
    lines = [f"vector: {vector_dir}", f"domain: {meta.get('domain', '?')}  preference: {meta.get('preference', '?')}",
             f"base: {meta.get('base_name') or train.get('base', '?')}  fingerprint: {meta.get('base_fingerprint', '?')}"]
    data = train.get("data", {})
    if data:
        lines.append(f"data: {', '.join(data.get('files', []))}  train records {data.get('train_records')}, "
                     f"sha256 {str(data.get('file_sha256', ''))[:16]}")
    lines.append(f"norm: {vec.norm():.4f} over {len(vec.keys())} stored tensors")
    cal = meta.get("calibration")
    if not cal:
        lines.append("calibration: none (run `meav calibrate " + str(vector_dir) + "`)")
    else:
        lines.append(f"calibration ({cal['split']}, n={cal['n']}): smallest |λ| at which each level is dominant")
        for lv, v in cal["levels"].items():
            lines.append(f"  {lv:<10} " + ("never dominant" if v is None else f"λ = {v['lambda']:+g}  ({v['fraction']:.2f})"))
    return "\n".join(lines)


def add_cli(sub) -> None:
    from meav_merge.coefficients import lambdas_arg, number_arg
    from meav_merge.cli.options import add_model
    from meav_merge.resources import data_dir

    def _cmd_calibrate(args):
        cal = calibrate(args.vector, args.model, args.data, domain=args.domain, split=args.split,
                        lambdas=args.lambdas, limit=args.limit, transfer=args.transfer)
        print(describe(args.vector))
        print(f"wrote the calibration ({cal['split']}, n={cal['n']}) into {Path(args.vector) / META_NAME}")

    p = sub.add_parser("calibrate", help="record in a vector the λ at which each level is dominant")
    p.add_argument("vector", help="alignment-vector directory")
    add_model(p, "target model")
    p.add_argument("--data", default=str(data_dir()), help="data folder or file (default: the shipped data)")
    p.add_argument("--domain", help="domain to calibrate on (default: the vector's own)")
    p.add_argument("--split", default="validation", help="split to sweep (default: %(default)s)")
    p.add_argument("--lambdas", type=lambdas_arg(), default=list(DEFAULT_LAMBDAS),
                   help="λ values to try (default: -4..4)")
    p.add_argument("--limit", type=number_arg("--limit", integer=True, positive=True), help="queries at most")
    p.add_argument("--transfer", action="store_true", help="allow a vector measured from another model")
    p.set_defaults(func=_cmd_calibrate)

    v = sub.add_parser("vector", help="inspect alignment vectors").add_subparsers(dest="vector_command", required=True)
    q = v.add_parser("info", help="provenance, norms and calibration of a vector")
    q.add_argument("dir", help="alignment-vector directory")
    q.set_defaults(func=lambda args: print(describe(args.dir)))
    from meav_merge.vectors.orthogonalize import add_vector_cli

    add_vector_cli(v)
