"""In-memory λ sweeps: θ = θ_target + Σ λ_i·v_i, re-weighted in place, scored without writing checkpoints.

``ReweightableModel`` keeps one copy of the touched target tensors and rebuilds the
weights from it for each λ point, so moving along a sweep costs one tensor add per
weight instead of a merge, a save and a reload. ``meav sweep``, the out-of-domain
tables and the coefficient search all evaluate through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from meav_merge.data.schema import Record
from meav_merge.evaluation.scoring import PreparedQuery, dominant, mean_logprobs, preference_accuracy, prepare
from meav_merge.evaluation.top_layer import top_layer_scorer
from meav_merge.vectors.alignment_vector import AlignmentVector, apply_vectors, check_vector_against, model_tensors
from meav_merge.io.rows import write_rows_csv


def parse_lambdas(spec: str, key: str = "--lambdas") -> List[float]:
    """'-1.5:1.0:0.1' (start:stop:step, inclusive) or '-1,-0.5,0,0.5'; every value finite."""
    from meav_merge.coefficients import parse_lambdas as parse

    return parse(spec, key)


class ReweightableModel:
    """A loaded target model plus vectors, re-weightable in place."""

    def __init__(self, model_dir: str | os.PathLike, vectors: Sequence[AlignmentVector] = (),
                 transfer: bool = False, dtype: torch.dtype = torch.float32, reuse_frozen_layers: bool = True):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True).eval()
        self.vectors = list(vectors)
        for i, v in enumerate(self.vectors):
            check_vector_against(v, model_dir, transfer=transfer, label=f"vector {v.path or i}")
        # Vectors store every tensor, but the CPU preset trains only the top layers: keep
        # (and re-weight) just the tensors some vector changes, and reuse the rest's work.
        self.changing = sorted({n for v in self.vectors for n in v.keys() if bool(v[n].any())})
        state = model_tensors(self.model, [n for v in self.vectors for n in v.keys()])
        self._base = {n: state[n].detach().clone() for n in self.changing}
        self.scorer = top_layer_scorer(self.model, self.changing) if reuse_frozen_layers else None
        self.coefficients: Tuple[float, ...] = tuple(0.0 for _ in self.vectors)
        self._scored: Dict[tuple, List[List[float]]] = {}

    def set(self, coefficients: Sequence[float]) -> None:
        coefficients = tuple(float(c) for c in coefficients)
        if len(coefficients) != len(self.vectors):
            raise ValueError(f"expected {len(self.vectors)} coefficients, got {len(coefficients)}")
        if coefficients != self.coefficients:
            apply_vectors(self.model, list(zip(self.vectors, coefficients)), base_state=self._base,
                          names=self.changing)
            self.coefficients = coefficients

    def along(self, lam: float, direction: Optional[Sequence[float]] = None) -> List[float]:
        """Coefficients λ·direction (default direction: every loaded vector at weight 1)."""
        return [lam * d for d in (direction if direction is not None else [1.0] * len(self.vectors))]

    def score(self, prepared: Sequence[PreparedQuery], progress: bool = False, desc: str = "score"):
        """Scores at the current coefficients; a (coefficients, queries) pair is scored once
        (sweeps, out-of-domain tables and Table 1 of one run meet at λ = 0 and at each other's points)."""
        key = (self.coefficients, _digest(prepared))
        if key not in self._scored:
            self._scored[key] = mean_logprobs(self.model, self.tokenizer, prepared, progress=progress, desc=desc,
                                              scorer=self.scorer)
        return [list(row) for row in self._scored[key]]


def _digest(prepared: Sequence[PreparedQuery]) -> str:
    h = hashlib.sha256()
    for q in prepared:
        h.update(repr((q.context_ids, q.continuations, q.n_whitespace)).encode())
    return h.hexdigest()


@dataclass
class SweepPoint:
    coefficients: Tuple[float, ...]
    fractions: Dict[str, float]
    mean_scores: Dict[str, float] = field(default_factory=dict)

    @property
    def dominant(self) -> Optional[str]:
        return dominant(self.fractions)


def evaluate_point(rm: ReweightableModel, coefficients: Sequence[float], prepared: Sequence[PreparedQuery],
                   levels: Sequence[str]) -> SweepPoint:
    rm.set(coefficients)
    scores = rm.score(prepared)
    fr = preference_accuracy(scores, levels)
    means = {lv: sum(row[i] for row in scores) / max(1, len(scores)) for i, lv in enumerate(levels)}
    return SweepPoint(tuple(coefficients), fr, means)


def sweep(rm: ReweightableModel, records: Sequence[Record], lambdas: Sequence[float],
          directions: Optional[Sequence[Sequence[float]]] = None, system: Optional[str] = None,
          desc: str = "sweep") -> List[SweepPoint]:
    """Score ``records`` at θ_target + λ·(Σ direction_i·v_i) for each λ (default: one vector)."""
    levels = records[0].levels
    prepared = prepare(rm.tokenizer, records, system=system, levels=levels)
    direction = directions[0] if directions else None
    points = []
    for lam in tqdm(lambdas, desc=desc, unit="λ"):
        points.append(evaluate_point(rm, rm.along(lam, direction), prepared, levels))
    return points


# The λ-control criterion of the training issue: the vector can push the model to either end.
CONTROL_POSITIVE, CONTROL_NEGATIVE = 0.8, 0.7


def lambda_control(summary: dict) -> dict:
    """Does some λ>0 make the most-preferred level win on ≥80% of queries and some λ<0
    the least-preferred one on ≥70%? ``summary`` is what ``write_sweep`` returns."""
    top, bottom = summary["levels"][0], summary["levels"][-1]
    lines, met = [], True
    for level, sign, need in ((top, 1, CONTROL_POSITIVE), (bottom, -1, CONTROL_NEGATIVE)):
        side = [p for p in summary["points"] if p["lambda"] * sign > 0]
        best = max(side, key=lambda p: p[f"pref_acc_{level}"], default=None)
        share = best[f"pref_acc_{level}"] if best else 0.0
        met &= share >= need
        lines.append(f"{level} {share:.2f} at λ={best['lambda']:+g} (need ≥{need:.2f})" if best
                     else f"no λ {'>' if sign > 0 else '<'} 0 swept")
    return {"met": met, "lines": lines}


def dominance_ranges(lambdas: Sequence[float], points: Sequence[SweepPoint]) -> List[Tuple[str, float, float]]:
    """Maximal runs of consecutive λ where one level is dominant: (level, λ_from, λ_to)."""
    runs: List[Tuple[str, float, float]] = []
    prev = None
    for lam, p in zip(lambdas, points):
        d = p.dominant
        if d is None:
            continue
        if runs and runs[-1][0] == d and runs[-1][2] == prev:
            runs[-1] = (d, runs[-1][1], lam)
        else:
            runs.append((d, lam, lam))
        prev = lam
    return runs


def write_sweep(out: Path, name: str, lambdas: Sequence[float], points: Sequence[SweepPoint], meta: dict) -> dict:
    levels = list(points[0].fractions)
    rows = [{"lambda": lam, **{f"pref_acc_{lv}": p.fractions[lv] for lv in levels},
             **{f"mean_logprob_{lv}": p.mean_scores.get(lv) for lv in levels}, "dominant": p.dominant or ""}
            for lam, p in zip(lambdas, points)]
    write_rows_csv(rows, out / f"{name}.csv")
    ranges = dominance_ranges(lambdas, points)
    summary = {**meta, "levels": levels, "points": rows,
               "dominance_ranges": [{"level": lv, "from": a, "to": b} for lv, a, b in ranges]}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_table(lambdas: Sequence[float], points: Sequence[SweepPoint]) -> str:
    levels = list(points[0].fractions)
    head = "   λ    " + "  ".join(f"{lv[:9]:>9}" for lv in levels) + "  dominant"
    lines = [head]
    for lam, p in zip(lambdas, points):
        lines.append(f"{lam:+6.2f}  " + "  ".join(f"{p.fractions[lv]:9.2f}" for lv in levels) + f"  {p.dominant or '-'}")
    return "\n".join(lines)
