"""Multi-domain coefficient search: reach a target level per domain with few exact evaluations.

The MEAV paper searches a 21³ grid (9,261 evaluations). Here, one *exact evaluation*
scores every domain's queries at one coefficient vector λ (in memory, see sweep.py),
and the search spends them in three phases:

1. **Probe** each vector alone along a few λ values. Every probe scores all domains,
   so it measures both a vector's effect on its own domain and its spill-over onto
   the others (the paper's Table 2), per query and per response level. Then probe
   each pair of vectors at the four corners (±a, ±a) to measure how they interact.
2. **Predict**: a surrogate of every response's token-mean log-probability,
   s(λ) ≈ s(0) + Σ_i f_i(λ_i) + Σ_ij g_ij(λ_i, λ_j), with f_i interpolated from the
   probes and g_ij bilinear per quadrant from the pair corners, predicts the
   winning level of every query, hence every domain's fractions, at any λ — a fine
   grid costs nothing. Each target's best predicted point (largest worst-domain
   margin; among equal margins, the smallest λ, where the surrogate errs least) is
   then evaluated exactly.
3. **Correct**: where a verified point misses, the observed residual (exact minus
   predicted scores) is added to the surrogate around that point, which accounts
   for interactions between vectors, and the corrected best point is evaluated;
   rounds repeat until every target is met or the budget is spent.

Every exact evaluation is checked against every target, so one point can settle
several. A target's level is *dominant* (paper §6.2) when its fraction is the
highest of the levels and above 1/3; the margin is how far it clears both.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from meav_merge.data.schema import PROFICIENCY_LEVELS, load_records
from meav_merge.evaluation.scoring import prepare
from meav_merge.evaluation.sweep import ReweightableModel

Target = Dict[str, str]  # domain -> level


def margin(fractions: Dict[str, float], level: str) -> float:
    """> 0 iff ``level`` is dominant: above every other level and above 1/n."""
    others = max([f for lv, f in fractions.items() if lv != level] + [1.0 / len(fractions)])
    return fractions[level] - others


def worst_margin(result: Dict[str, Dict[str, float]], target: Target) -> float:
    return min(margin(result[d], lv) for d, lv in target.items())


def rank_key(e: "Evaluation", target: Target) -> Tuple[float, float, float]:
    """Largest worst-domain margin first; among equals, the largest mean margin (so the
    best point for an unreachable target still meets as many domains as it can), then
    the largest score gap (see ``gap_margin``)."""
    ms = [margin(e.fractions[d], lv) for d, lv in target.items()]
    return (min(ms), sum(ms) / len(ms), gap_margin(e.scores, target))


# Token-mean log-prob gaps between a query's responses are O(0.1-1); the scale only sets
# where tanh saturates, so one very confident query cannot outweigh the others.
GAP_SCALE = 0.25


def gap_margin(scores: Dict[str, np.ndarray], target: Target) -> float:
    """Continuous tie-break in (-1, 1): in the worst domain, the mean over queries of how far
    the target response's score clears the best other response (tanh-squashed).

    With few queries per domain the win fractions are coarse and many evaluated points
    share one margin; this reports the one whose wins are least marginal, the one least
    likely to flip on other queries. ``scores[d]`` is [queries, levels].
    """
    gaps = []
    for d, lv in target.items():
        s = np.asarray(scores[d])
        t = PROFICIENCY_LEVELS.index(lv)
        gap = s[:, t] - np.delete(s, t, axis=1).max(axis=1)
        gaps.append(float(np.tanh(gap / GAP_SCALE).mean()))
    return min(gaps)


def _add_weighted(total: np.ndarray, w: np.ndarray, resid: np.ndarray) -> None:
    """total[g] += w[g]·resid at the grid points g whose weight is not zero (most are)."""
    near = np.nonzero(w)[0]
    total[near] += w[near, None, None] * resid[None]


def fractions_from_scores(scores: np.ndarray, levels: Sequence[str]) -> Dict[str, float]:
    wins = scores.argmax(axis=-1)
    return {lv: float((wins == i).mean()) for i, lv in enumerate(levels)}


@dataclass
class Evaluation:
    coefficients: Tuple[float, ...]
    scores: Dict[str, np.ndarray]  # domain -> [queries, levels]
    fractions: Dict[str, Dict[str, float]]


@dataclass
class SearchResult:
    target: Target
    coefficients: Tuple[float, ...]
    fractions: Dict[str, Dict[str, float]]
    margin: float
    reached: bool
    evaluations: int  # exact evaluations spent up to the point this target was settled


@dataclass
class Best:
    """The best evaluation seen for each target, by ``rank_key``, and when it was found."""

    targets: Sequence[Target]
    entries: Dict[int, tuple] = field(default_factory=dict)  # k -> (key, evaluation, evaluations so far)

    def record(self, e: Evaluation, count: int) -> None:
        for k, t in enumerate(self.targets):
            key = rank_key(e, t)
            if k not in self.entries or key > self.entries[k][0]:
                self.entries[k] = (key, e, count)

    def reached(self, k: int) -> bool:
        return k in self.entries and self.entries[k][0][0] > 0

    def results(self, evaluations: Optional[int] = None) -> List[SearchResult]:
        """``evaluations``: report this count for every target instead of when each was settled."""
        return [SearchResult(t, self.entries[k][1].coefficients, self.entries[k][1].fractions,
                             self.entries[k][0][0], self.reached(k),
                             self.entries[k][2] if evaluations is None else evaluations)
                for k, t in enumerate(self.targets)]


class ExactEvaluator:
    """Scores every domain at a λ vector; caches by λ and counts real evaluations."""

    def __init__(self, rm: ReweightableModel, data: str, domains: Sequence[str], split: str = "validation",
                 limit: Optional[int] = None):
        self.rm = rm
        self.domains = list(domains)
        self.prepared = {}
        for d in domains:
            recs = load_records(data, d, None if split == "all" else split)[: limit or None]
            self.prepared[d] = prepare(rm.tokenizer, recs, levels=PROFICIENCY_LEVELS)
        self.cache: Dict[Tuple[float, ...], Evaluation] = {}
        self.count = 0
        from tqdm.auto import tqdm

        # one exact evaluation scores every domain's queries (seconds to a minute on CPU)
        self.bar = tqdm(desc=f"exact evaluations ({split})", unit="eval", leave=False)

    def __call__(self, coefficients: Sequence[float]) -> Evaluation:
        key = tuple(round(float(c), 4) for c in coefficients)
        if key not in self.cache:
            self.rm.set(key)
            scores = {d: np.asarray(self.rm.score(p)) for d, p in self.prepared.items()}
            fr = {d: fractions_from_scores(s, PROFICIENCY_LEVELS) for d, s in scores.items()}
            self.cache[key] = Evaluation(key, scores, fr)
            self.count += 1
            self.bar.update()
        return self.cache[key]


class Surrogate:
    """Separable model of every response's score plus pairwise interactions, corrected by
    observed residuals.

    ``pairs`` are exact evaluations with exactly two non-zero coefficients ±a (one per
    quadrant of each pair of vectors). What the separable part misses there is the
    pair's interaction; it is spread bilinearly over that quadrant (zero on the axes,
    where the separable part is exact) and held flat beyond ±a.
    """

    def __init__(self, base: Evaluation, probes: Dict[int, List[Evaluation]], n_vectors: int,
                 pairs: Sequence[Evaluation] = ()):
        self.base = base
        self.n = n_vectors
        # per vector: sorted probe λ values and the score change they caused
        self.curves = []
        for i in range(n_vectors):
            pts = sorted([(0.0, {d: np.zeros_like(s) for d, s in base.scores.items()})] +
                         [(e.coefficients[i], {d: e.scores[d] - base.scores[d] for d in base.scores})
                          for e in probes.get(i, [])], key=lambda t: t[0])
            self.curves.append(pts)
        self.corrections: List[Tuple[np.ndarray, Dict[str, np.ndarray]]] = []
        self._cached: Optional[Tuple[np.ndarray, Dict[str, np.ndarray]]] = None
        # (i, j, corner λ_i, corner λ_j, residual per domain); a pair's weight is zero at
        # every other pair's corner, so the order of fitting does not matter
        self.interactions: List[tuple] = []
        for e in pairs:
            i, j = [k for k, c in enumerate(e.coefficients) if c != 0]
            sep = self._separable(np.array([e.coefficients]))
            self.interactions.append((i, j, e.coefficients[i], e.coefficients[j],
                                      {d: e.scores[d] - sep[d][0] for d in e.scores}))

    def _curve(self, i: int, lams: np.ndarray, domain: str) -> np.ndarray:
        xs = np.array([p[0] for p in self.curves[i]])
        ys = np.stack([p[1][domain] for p in self.curves[i]])  # [K, Q, L]
        flat = ys.reshape(len(xs), -1)
        out = np.empty((len(lams), flat.shape[1]))
        for j in range(flat.shape[1]):
            out[:, j] = np.interp(lams, xs, flat[:, j])  # flat beyond the probed range
        return out.reshape((len(lams),) + ys.shape[1:])

    def add_correction(self, exact: Evaluation) -> None:
        pred = self.predict_scores(np.array([exact.coefficients]))
        self.corrections.append((np.array(exact.coefficients),
                                 {d: exact.scores[d] - pred[d][0] for d in exact.scores}))

    def _separable(self, grid: np.ndarray) -> Dict[str, np.ndarray]:
        # The search predicts on the same large grid for every target: compute it once.
        if self._cached is not None and self._cached[0] is grid:
            return self._cached[1]
        out = {}
        for d, s0 in self.base.scores.items():
            total = np.broadcast_to(s0, (len(grid),) + s0.shape).copy()
            for i in range(self.n):
                total += self._curve(i, grid[:, i], d)
            for i, j, ci, cj, resid in self.interactions:
                _add_weighted(total, np.clip(grid[:, i] / ci, 0, 1) * np.clip(grid[:, j] / cj, 0, 1), resid[d])
            out[d] = total
        if len(grid) > 1:
            self._cached = (grid, out)
        return out

    def predict_scores(self, grid: np.ndarray, radius: float = 0.5) -> Dict[str, np.ndarray]:
        out = {d: s.copy() for d, s in self._separable(grid).items()}
        for where, resid in self.corrections:
            # the residual holds near the point it was observed at, fading out by `radius`
            w = np.clip(1 - np.abs(grid - where).max(axis=1) / radius, 0, 1)
            for d in out:
                _add_weighted(out[d], w, resid[d])
        return out

    def predict_margins(self, grid: np.ndarray, target: Target) -> np.ndarray:
        scores = self.predict_scores(grid)
        margins = []
        for d, lv in target.items():
            wins = scores[d].argmax(axis=-1)  # [G, Q]
            fr = np.stack([(wins == i).mean(axis=1) for i in range(len(PROFICIENCY_LEVELS))], axis=1)
            t = PROFICIENCY_LEVELS.index(lv)
            others = np.delete(fr, t, axis=1).max(axis=1)
            margins.append(fr[:, t] - np.maximum(others, 1.0 / len(PROFICIENCY_LEVELS)))
        stacked = np.stack(margins)
        # Ties: the largest mean margin, as rank_key does, then the smallest λ. The surrogate
        # is exact on the axes and its error (unmodelled interaction) grows with |λ|;
        # small |λ| also keeps generation fluent. Both terms stay far below one fraction step.
        size = np.abs(grid).max(axis=1) / max(1e-9, float(np.abs(grid).max()))
        return stacked.min(axis=0) + 1e-3 * stacked.mean(axis=0) - 1e-4 * size


@dataclass
class SearchConfig:
    # CPU-preset vectors (top 4 layers) need |λ| up to about 4 (docs/results/)
    low: float = -4.0
    high: float = 4.0
    probe_points: Tuple[float, ...] = (-4.0, -2.0, -0.8, 1.0, 2.4, 4.0)
    grid_step: float = 0.1
    budget: int = 100
    corrections_per_target: int = 4  # rounds after the first; the budget caps them
    # |λ| of the pairwise probes (4 per pair of vectors); 0 = separable surrogate only
    pair_probe: float = 2.0

    @classmethod
    def spanning(cls, low: float, high: float, budget: int = 100) -> "SearchConfig":
        """Probes spread over [low, high]: three on each side of 0, denser near it."""
        neg = [round(low * f, 2) for f in (1.0, 0.5, 0.2)] if low < 0 else []
        pos = [round(high * f, 2) for f in (0.25, 0.6, 1.0)] if high > 0 else []
        return cls(low=low, high=high, probe_points=tuple(neg + pos), budget=budget,
                   pair_probe=round(0.5 * min(abs(low), abs(high)), 2) if low < 0 < high else 0.0)


def all_targets(domains: Sequence[str]) -> List[Target]:
    return [dict(zip(domains, combo)) for combo in itertools.product(PROFICIENCY_LEVELS, repeat=len(domains))]


def search(evaluator: ExactEvaluator, targets: Sequence[Target], config: SearchConfig = SearchConfig(),
           progress: bool = True) -> List[SearchResult]:
    from tqdm.auto import tqdm

    n = len(evaluator.rm.vectors)
    base = evaluator((0.0,) * n)
    probes: Dict[int, List[Evaluation]] = {}
    for i in range(n):
        for lam in config.probe_points:
            c = [0.0] * n
            c[i] = lam
            probes.setdefault(i, []).append(evaluator(c))
    pairs = []
    if config.pair_probe and n > 1:
        for i, j in itertools.combinations(range(n), 2):
            for si, sj in itertools.product((1.0, -1.0), repeat=2):
                c = [0.0] * n
                c[i], c[j] = si * config.pair_probe, sj * config.pair_probe
                pairs.append(evaluator(c))
    surrogate = Surrogate(base, probes, n, pairs)
    axis = np.round(np.arange(config.low, config.high + 1e-9, config.grid_step), 4)
    grid = np.array(list(itertools.product(axis, repeat=n)))

    best = Best(targets)
    for e in evaluator.cache.values():
        best.record(e, evaluator.count)
    bar = tqdm(total=len(targets), desc="search", disable=not progress)
    pending = [k for k in range(len(targets)) if not best.reached(k)]
    bar.update(len(targets) - len(pending))
    for round_ in range(1 + config.corrections_per_target):
        still = []
        for k in pending:
            if best.reached(k):
                bar.update(1)
                continue
            if evaluator.count >= config.budget:
                still.append(k)
                continue
            pred = surrogate.predict_margins(grid, targets[k])
            candidates = np.argsort(-pred, kind="stable")
            choice = next((grid[j] for j in candidates[:50] if tuple(np.round(grid[j], 4)) not in evaluator.cache),
                          grid[candidates[0]])
            e = evaluator(choice)
            best.record(e, evaluator.count)
            surrogate.add_correction(e)
            bar.set_postfix(evaluations=evaluator.count, refresh=True)
            if best.reached(k):
                bar.update(1)
            else:
                still.append(k)
        pending = still
        if not pending:
            break
    bar.close()
    return best.results()


def grid_search(evaluator: ExactEvaluator, targets: Sequence[Target], step: float = 0.5, low: float = -4.0,
                high: float = 1.5, progress: bool = True) -> List[SearchResult]:
    """The paper's exhaustive search (coarser step for CPU): every grid point exactly."""
    from tqdm.auto import tqdm

    n = len(evaluator.rm.vectors)
    axis = np.round(np.arange(low, high + 1e-9, step), 4)
    best = Best(targets)
    for c in tqdm(list(itertools.product(axis, repeat=n)), desc="grid", disable=not progress):
        best.record(evaluator(c), evaluator.count)
    return best.results(evaluations=evaluator.count)
