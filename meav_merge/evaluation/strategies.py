"""More ways to spend exact evaluations on multi-domain targets, beside ``search`` and ``grid_search``.

- ``cmaes_search``: CMA-ES over the scalar λ of each vector, one run per unsettled
  target (what ``mergekit-evolve`` does with lm-eval as the fitness).
- ``gradient_refine``: for each target the scalar search missed, per-block coefficients
  fitted by gradient from its best scalar point (``coefficient_fit``), then checked
  exactly. Each gradient step scores the fitting queries once, so it is counted as one
  evaluation, which keeps the comparison at an equal budget honest.
- ``levels_search``: each target first at the λ each vector's own calibration gives its
  level (one evaluation per target): with domain-specific vectors the levels compose,
  so this is the whole search; the surrogate search spends what budget is left on the
  targets it misses.
- ``held_out``: every result re-scored on another split. Coefficients are fitted on
  validation; what is reported comes from test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from meav_merge.data.schema import PROFICIENCY_LEVELS
from meav_merge.evaluation.search import (Best, ExactEvaluator, SearchResult, Target, fractions_from_scores,
                                          margin, rank_key)

logger = logging.getLogger(__name__)


def calibrated_point(metas: Sequence[dict], target: Target) -> tuple:
    """λ per vector from its calibration (``meta["calibration"]``); 0 where its level was never dominant."""
    out = []
    for meta, level in zip(metas, target.values()):
        entry = (meta.get("calibration") or {}).get("levels", {}).get(level)
        out.append(float(entry["lambda"]) if entry else 0.0)
    return tuple(out)


def levels_search(evaluator: ExactEvaluator, targets: Sequence[Target], budget: int = 100, low: float = -4.0,
                  high: float = 4.0) -> List[SearchResult]:
    from meav_merge.evaluation.search import SearchConfig, search

    metas = [v.meta for v in evaluator.rm.vectors]
    missing = [v.path or i for i, v in enumerate(evaluator.rm.vectors) if not v.meta.get("calibration")]
    if missing:
        raise ValueError(f"vector {missing[0]}: the levels strategy needs calibrated vectors (meav calibrate)")
    for t in targets:
        evaluator(calibrated_point(metas, t))
    if evaluator.count >= budget:
        best = Best(targets)
        for e in evaluator.cache.values():
            best.record(e, evaluator.count)
        return best.results()
    # the surrogate sees every cached evaluation, so the calibrated points are its starting knowledge
    return search(evaluator, targets, SearchConfig.spanning(low, high, budget=budget))


def cmaes_search(evaluator: ExactEvaluator, targets: Sequence[Target], budget: int = 100, low: float = -4.0,
                 high: float = 4.0, seed: int = 0) -> List[SearchResult]:
    import cma

    n = len(evaluator.rm.vectors)
    best = Best(targets)
    best.record(evaluator((0.0,) * n), evaluator.count)
    for k, target in enumerate(targets):
        left = budget - evaluator.count
        if best.reached(k) or left <= 0:
            continue
        # the budget still unspent, shared evenly by the targets still open
        share = max(1, left // sum(1 for j in range(k, len(targets)) if not best.reached(j)))
        es = cma.CMAEvolutionStrategy([0.0] * n, (high - low) / 4,
                                      {"bounds": [low, high], "seed": seed + k + 1, "verbose": -9,
                                       "popsize": max(4, min(8, share // 3))})
        spent = 0
        while spent < share and not best.reached(k):
            xs = es.ask()
            losses = []
            for x in xs:
                if spent >= share:
                    losses.append(1.0)
                    continue
                e = evaluator(np.round(x, 2))
                spent += 1
                best.record(e, evaluator.count)
                key = rank_key(e, target)
                losses.append(-(key[0] + 0.1 * key[1] + 0.01 * key[2]))
            es.tell(xs, losses)
    return best.results()


@dataclass
class BlockResult:
    target: Target
    coefficients: object  # torch tensor [vectors, blocks]
    fractions: Dict[str, Dict[str, float]]
    margin: float
    reached: bool
    lambda_settings: List[object]


def _block_fractions(fit, coef, prepared) -> Dict[str, Dict[str, float]]:
    fit.apply(coef)
    return {d: fractions_from_scores(np.asarray(fit.rm.score(p)), PROFICIENCY_LEVELS) for d, p in prepared.items()}


def gradient_refine(evaluator: ExactEvaluator, results: Sequence[SearchResult], steps: int = 12,
                    queries_per_domain: int = 8, config=None, progress: bool = True,
                    budget: Optional[int] = None) -> Dict[int, BlockResult]:
    """Per-block fits for the targets in ``results`` that were not reached; returns the improved ones by index.

    A fit costs ``steps + 1`` evaluations (its steps and the exact check); one that would
    take ``evaluator.count`` past ``budget`` is not started, so strategies compare at equal cost."""
    from meav_merge.evaluation.coefficient_fit import BlockCoefficientFit, FitConfig

    config = config or FitConfig(steps=steps)
    fit = BlockCoefficientFit(evaluator.rm)
    # a subset of the fitting split keeps a step affordable on CPU; the check uses all of it
    subset = {d: list(p)[:queries_per_domain] for d, p in evaluator.prepared.items()}
    out = {}
    for k, r in enumerate(results):
        if r.reached:
            continue
        if budget is not None and evaluator.count + config.steps + 1 > budget:
            logger.info("gradient fit: budget %d spent (%d evaluations), %s left at its scalar point",
                        budget, evaluator.count, r.target)
            continue
        coef, _ = fit.fit(subset, r.target, start=fit.expand(r.coefficients), config=config, progress=progress)
        evaluator.count += config.steps + 1
        fr = _block_fractions(fit, coef, evaluator.prepared)
        m = min(margin(fr[d], lv) for d, lv in r.target.items())
        logger.info("gradient fit %s: worst margin %+.3f -> %+.3f", r.target, r.margin, m)
        if m > r.margin:
            out[k] = BlockResult(r.target, coef, fr, m, m > 0, fit.lambda_settings(coef))
    evaluator.rm.set((0.0,) * len(evaluator.rm.vectors))  # fit.apply wrote block weights in place
    return out


def held_out(results: Sequence[SearchResult], blocks: Dict[int, BlockResult], test: ExactEvaluator) -> List[dict]:
    """Each target's chosen coefficients scored on ``test``: fractions, margin, reached."""
    from meav_merge.evaluation.coefficient_fit import BlockCoefficientFit

    fit = BlockCoefficientFit(test.rm) if blocks else None
    rows = []
    for k, r in enumerate(results):
        if k in blocks:
            fr = _block_fractions(fit, blocks[k].coefficients, test.prepared)
        else:
            fr = test(r.coefficients).fractions
        m = min(margin(fr[d], lv) for d, lv in r.target.items())
        rows.append({"target": r.target, "fractions": fr, "worst_margin": m, "reached": m > 0,
                     "per_block": k in blocks})
    test.rm.set((0.0,) * len(test.rm.vectors))
    return rows
