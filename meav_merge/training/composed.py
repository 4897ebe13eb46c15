"""Composed training: one alignment vector per domain, learned together so their λ compose.

Vectors trained one domain at a time (``dpo.py``) learn mostly a domain-general
"specific vs refuse" direction, so λ_medical also moves financial and legal answers
(measured: 2:1 selective at best, even with zero-margin retain pairs). Here the vectors
are trained *as they will be used*: at every step a λ is drawn for each domain from
{−1, 0, +1}, the weights are θ_c + Σ_d λ_d·AV_d, and each domain's queries are pushed
toward the level its own λ asks for (−1 avoidance, 0 generic, +1 expert). A vector that
spilled onto another domain would be penalized whenever that domain's λ differs.

θ_c = θ_base + AV_center is a *centered* model, learned alongside, at which every domain
is generic: the base model prefers avoidance in some domains, and a vector scaled by
λ = 0 cannot change that. The centered model is written as a full checkpoint and the
domain vectors are relative to it, so recipes, ``meav search`` and ``lm_eval`` use it as
``base_model`` unchanged.

The loss is the quantity preference accuracy ranks: a softmax over the three levels'
token-mean log-probs (scaled by ``sharpness``), plus an NLL anchor on the target
response so probability mass is not moved onto text in neither response, plus a
*fluency* term: the KL divergence from the base model's next-token distribution at every
position of the response the step's λ asks for (``fluency_rows``), under that λ. The NLL
anchor only watches the one token the data has at each position; the rest of the
distribution was free to drift, and
summed vectors drifted it onto a few words ("like", "can also") that greedy decoding then
loops on (README, "Shipped recipes"). The KL watches the whole distribution, so the
ranking is reached with the smallest change that reaches it, as in DPO's KL-regularized
objective. It costs some level control at the trained λ: legal expert needs +1.25 with it
(docs/results/fluency_kl/).
The base's distribution is kept as its top ``fluency_top_k`` tokens plus one
bin for the rest (an exact KL between those coarsened distributions, a lower bound of the
full one) and computed once, before training. Scoring's own tokenization
(``evaluation.scoring.prepare``) is used, so what is trained is what is scored.

A custom loop rather than trl: trl trains one model on pairs, while here each step's
weights are a λ-weighted sum of several parameter sets, which neither trl nor peft offers.
Only the top layers train, on the frozen trunk's cached states (``trunk.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from meav_merge.data.schema import PROFICIENCY_LEVELS, file_sha256, load_records, resolve_data_files
from meav_merge.io.checkpoint import atomic_output_dir, copy_model_files

logger = logging.getLogger(__name__)

# The fluency term looks at every FLUENCY_STRIDE-th response position: the base model's LM head over
# every position cost a third of the frozen-trunk set-up on top of it (~2.5 min at the defaults), and adjacent
# positions of one text say much the same about a drift of the whole distribution.
FLUENCY_STRIDE = 2
# λ of a domain → the level it asks for
LEVEL_AT = {-1: "avoidance", 0: "generic", 1: "expert"}


def _help(text: str, **meta) -> dict:
    return {"help": text, **meta}


@dataclass
class ComposedTrainConfig:
    """Settings of ``meav train-composed``; every field is a flag with this help text."""

    # 700 × 1 query per domain: each train query is seen ~2.7 times, each level ~233 times per domain
    steps: int = field(default=700, metadata=_help(
        "optimizer steps; each draws a λ in {-1, 0, +1} per domain and queries from every domain", positive=True))
    queries_per_domain: int = field(default=1, metadata=_help("train queries per domain and step", positive=True))
    # the CPU DPO preset's rate; measured on the embedded model (docs/results/multidomain/composed/)
    learning_rate: float = field(default=2e-4, metadata=_help(
        "AdamW learning rate of every vector", flags=("--lr", "--learning-rate"), positive=True))
    warmup_ratio: float = field(default=0.05, metadata=_help("share of steps spent warming up (cosine decay after)",
                                                             minimum=0))
    trainable_layers: int = field(default=4, metadata=_help("top transformer layers the vectors change",
                                                            positive=True))
    sharpness: float = field(default=10.0, metadata=_help(
        "scale on token-mean log-probs in the softmax over levels (like DPO's β on a per-token margin)",
        positive=True))
    anchor_weight: float = field(default=0.2, metadata=_help(
        "weight of the NLL of the target response (keeps the text likely, so generation stays fluent)",
        minimum=0))
    # On by default since 2026-12-06 at 0.4 on the target row: the insurance text stops looping
    # (distinct-2 with repetition penalty 1.1 0.99 / 0.95 / 0.96 at the recipe's λ, was 0.85 / 0.79 /
    # 0.75 without the term) and, with legal expert at λ = +1.25 (fitted on validation), 25 of the
    # 27 combinations hold on test (24 without the term at +1/0/-1; the goal is 22). At 1.0 legal
    # expert is lost; on all rows at 0.5 only 15/27 hold (docs/results/fluency_kl/).
    fluency_weight: float = field(default=0.4, metadata=_help(
        "weight of the KL divergence from the base model's next-token distribution on the responses "
        "(0: off); keeps summed vectors from drifting greedy text into loops, at a cost in level control "
        "(docs/results/fluency_kl/)", minimum=0))
    # "target": the KL only along the response the step's λ asks for. On the other two rows the level
    # loss lowers the data's tokens and the KL holds them up, so "all" spends the term fighting the
    # level loss on two rows of three (docs/results/fluency_kl/, "The term on the target row only").
    fluency_rows: str = field(default="target", metadata=_help(
        "responses the fluency KL looks at: all three levels', or only the target level's",
        choices=("all", "target"), recorded_before="all"))
    fluency_top_k: int = field(default=16, metadata=_help(
        "base-model tokens kept per position for that KL; the rest share one bin", positive=True))
    max_length: int = field(default=256, metadata=_help("longest prompt + response in tokens", positive=True))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm", positive=True))
    train_records: Optional[int] = field(default=None, metadata=_help(
        "at most this many train records per domain (default: all)", positive=True))
    seed: int = field(default=0, metadata=_help("sampling and initialization seed", minimum=0))
    logging_steps: int = field(default=25, metadata=_help("log the running loss every N steps", positive=True))

    def __post_init__(self):
        from meav_merge.coefficients import check_config_fields

        check_config_fields(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Query:
    rows: List[List[int]]  # context + continuation ids, one row per level (expert, generic, avoidance)
    starts: List[int]  # index of each row's first scored response token
    context: List[int]
    # the base model's top-k next-token (ids, log-probs) at every FLUENCY_STRIDE-th response position
    reference: Optional[tuple] = None


def _queries(tokenizer, records, max_length: int) -> List[_Query]:
    from meav_merge.evaluation.scoring import prepare

    out = []
    for p in prepare(tokenizer, records, levels=PROFICIENCY_LEVELS):
        rows, starts = [], []
        for cont in p.continuations:
            row = (p.context_ids + cont)[:max_length]
            start = len(p.context_ids) + p.n_whitespace
            if start >= len(row):
                break
            rows.append(row)
            starts.append(start)
        if len(rows) == len(PROFICIENCY_LEVELS):  # a context longer than max_length is skipped
            out.append(_Query(rows, starts, p.context_ids))
    return out


def response_logprobs(head, params: dict, queries: Sequence[_Query]):
    """Next-token log-probs at every response position of every level of every query under
    ``head`` with ``params``: (positions, vocab), the positions' targets and each row's count.
    The LM head's log-probs are computed here rather than by ``evaluation.scoring.token_logprobs``:
    its logsumexp form costs 0.1-0.2 s more per step in backward than the fused log-softmax."""
    import torch.nn.functional as F

    states, targets, counts = response_states(head, params, queries)
    return F.log_softmax(head.lm_head(states).float(), dim=-1), targets, counts  # one LM-head pass


def response_states(head, params: dict, queries: Sequence[_Query]):
    """The LM head's inputs at every response position (positions, hidden), their targets and
    each row's count.

    Each query's context goes through the head once and its three responses continue
    from that KV cache (repeated per response), instead of three padded rows that each
    repeat the context: the same function to float precision, gradients included, with
    about 40% fewer token-layer passes (tests/test_composed.py checks it against a plain
    forward of each row; bench/composed_step.py times it against the padded rows)."""
    import torch
    from torch.func import functional_call

    from meav_merge.layers import cache_arg, kv_cache

    trunk = head.model.embed_tokens  # TrunkEmbedding: the frozen trunk's cached states per row
    inputs, targets, counts = [], [], []
    for q in queries:
        c = len(q.context)
        states = [trunk.hidden(torch.tensor(r)) for r in q.rows]
        ctx = functional_call(head.model, params, (), {"inputs_embeds": states[0][None, :c], "use_cache": True})
        tails = [s[c:] for s in states]
        width = max(len(t) for t in tails)
        emb = torch.zeros(len(tails), width, states[0].shape[-1], dtype=states[0].dtype)
        mask = torch.zeros(len(tails), c + width, dtype=torch.long)
        mask[:, :c] = 1
        for j, t in enumerate(tails):
            emb[j, : len(t)], mask[j, c: c + len(t)] = t, 1
        kv = kv_cache(ctx)
        kv.batch_repeat_interleave(len(tails))  # differentiable: the context's keys depend on params
        hidden = functional_call(head.model, params, (), {"inputs_embeds": emb, "attention_mask": mask,
                                                          cache_arg(): kv, "use_cache": False}).last_hidden_state
        for j, (r, s) in enumerate(zip(q.rows, q.starts)):
            # token t is predicted at position t-1; only response tokens (from s on) count
            full = torch.cat([ctx.last_hidden_state[0], hidden[j, : len(r) - c]])
            inputs.append(full[s - 1: len(r) - 1])
            targets.extend(r[s:])
            counts.append(len(r) - s)
    return torch.cat(inputs), torch.tensor(targets), counts


def level_logprobs(head, params: dict, queries: Sequence[_Query]):
    """Token-mean log-prob of every level of every query under ``head`` with ``params``: (n, 3)."""
    return level_means(response_logprobs(head, params, queries))


def level_means(logprobs):
    """``response_logprobs``'s result → token-mean log-prob of each row, one line per query: (n, 3)."""
    import torch

    logp, targets, counts = logprobs
    picked = logp.gather(1, targets[:, None])[:, 0]
    return torch.stack([p.mean() for p in picked.split(counts)]).view(-1, len(PROFICIENCY_LEVELS))


def attach_reference(head, params: dict, queries: Sequence[_Query], top_k: int, batch: int = 4) -> None:
    """Store, on each query, the top-k next-token distribution of ``head`` with ``params`` (the
    base model) at its response positions: the fluency term's reference, computed once."""
    import torch
    from tqdm.auto import tqdm

    todo = [q for q in queries if q.reference is None]
    with torch.inference_mode():
        for i in tqdm(range(0, len(todo), batch), desc="fluency reference", unit="batch", leave=False):
            chunk = todo[i:i + batch]
            states, _, counts = response_states(head, params, chunk)
            per_query = _per_query(counts)
            states = torch.cat([s[::FLUENCY_STRIDE] for s in states.split(per_query)])
            logits = head.lm_head(states).float()
            # top-k of the logits minus their logsumexp: no (positions, vocab) log-softmax is written
            top = logits.topk(top_k, dim=-1)
            top.values.sub_(logits.logsumexp(-1, keepdim=True))
            kept = [len(range(0, n, FLUENCY_STRIDE)) for n in per_query]
            for q, ids, lp in zip(chunk, top.indices.split(kept), top.values.split(kept)):
                q.reference = (ids.to(torch.int32), lp.clone())


def _per_query(row_counts: List[int]) -> List[int]:
    """Response positions per query, from ``response_logprobs``'s positions per row."""
    k = len(PROFICIENCY_LEVELS)
    return [sum(row_counts[i:i + k]) for i in range(0, len(row_counts), k)]


def _row_span(row_counts: List[int], row: int) -> slice:
    """The strided positions (every ``FLUENCY_STRIDE``-th of a query's rows laid end to end) that fall
    in row ``row``: ``row_counts`` are one query's positions per row."""
    start = sum(row_counts[:row])
    ceil = lambda n: -(-n // FLUENCY_STRIDE)  # noqa: E731
    return slice(ceil(start), ceil(start + row_counts[row]))


def fluency_kl(logprobs, queries: Sequence[_Query], rows: Optional[Sequence[int]] = None):
    """Mean over response positions (every ``FLUENCY_STRIDE``-th) of KL(base ‖ model) between the
    top-k-plus-rest coarsenings of the two next-token distributions. ``logprobs``: ``response_logprobs``
    of ``queries``, on which ``attach_reference`` has run; ``rows``: per query, the one level row to
    look at (default: all three)."""
    import torch

    logp, _, counts = logprobs
    k = len(PROFICIENCY_LEVELS)
    per_query = [lp[::FLUENCY_STRIDE] for lp in logp.split(_per_query(counts))]
    ids = [q.reference[0] for q in queries]
    ref = [q.reference[1] for q in queries]
    if rows is not None:
        spans = [_row_span(counts[i * k:(i + 1) * k], r) for i, r in enumerate(rows)]
        per_query, ids, ref = ([x[s] for x, s in zip(xs, spans)] for xs in (per_query, ids, ref))
    logp, ids, ref = torch.cat(per_query), torch.cat(ids).long(), torch.cat(ref)
    model = logp.gather(1, ids)
    # the rest bin: log(1 - Σ top-k p), clamped so a near-one top-k mass stays finite
    rest = lambda lp: torch.log1p(-lp.exp().sum(-1).clamp(max=1 - 1e-6))  # noqa: E731
    ref_rest, model_rest = rest(ref), rest(model)
    kl = (ref.exp() * (ref - model)).sum(-1) + ref_rest.exp() * (ref_rest - model_rest)
    return kl.mean()


def composed_loss(means, targets, sharpness: float, anchor_weight: float):
    """Softmax cross-entropy of the target levels plus the target responses' NLL; and hits."""
    import torch
    import torch.nn.functional as F

    t = torch.tensor(targets)
    ce = F.cross_entropy(sharpness * means, t)
    anchor = -means.gather(1, t[:, None]).mean()
    return ce + anchor_weight * anchor, (means.argmax(1) == t).float().mean()


def _sample(rng: random.Random, domains: Sequence[str], queries: Dict[str, List[_Query]], per_domain: int):
    lam = {d: rng.choice((-1, 0, 1)) for d in domains}
    batch, targets = [], []
    for d in domains:
        for q in rng.sample(queries[d], per_domain):
            batch.append(q)
            targets.append(PROFICIENCY_LEVELS.index(LEVEL_AT[lam[d]]))
    return lam, batch, targets


def _weights(base: dict, center: dict, vectors: Dict[str, dict], lam: Dict[str, int]) -> dict:
    out = {}
    for n, w in base.items():
        w = w + center[n]
        for d, scale in lam.items():
            if scale:
                w = w + scale * vectors[d][n]
        out[n] = w
    return out


def _draws(queries: Dict[str, List[_Query]], config: ComposedTrainConfig) -> list:
    """Every step's (λ, queries, targets), drawn up front: the draws depend on the seed alone, and
    knowing them lets the trunk set-up skip the queries no step uses (~7% at the defaults)."""
    rng = random.Random(config.seed)
    return [_sample(rng, list(queries), queries, config.queries_per_domain) for _ in range(config.steps)]


def _optimize(head, queries: Dict[str, List[_Query]], draws: list, config: ComposedTrainConfig):
    """The training loop: returns the centered deltas, each domain's deltas and the loss log."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    domains = list(queries)
    base = {n: p.detach() for n, p in head.model.named_parameters() if n.startswith("layers.") or n == "norm.weight"}
    for p in head.parameters():
        p.requires_grad = False
    center = {n: torch.nn.Parameter(torch.zeros_like(w)) for n, w in base.items()}
    vectors = {d: {n: torch.nn.Parameter(torch.zeros_like(w)) for n, w in base.items()} for d in domains}
    params = list(center.values()) + [p for v in vectors.values() for p in v.values()]
    # fused: one kernel over all tensors, 3x faster than the per-tensor loop CPU defaults to (56M params)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(config.warmup_ratio * config.steps), config.steps)
    log, window = [], []
    bar = tqdm(range(1, config.steps + 1), desc="composed training", unit="step")
    for step, (lam, batch, targets) in zip(bar, draws):
        logprobs = response_logprobs(head, _weights(base, center, vectors, lam), batch)
        loss, hits = composed_loss(level_means(logprobs), targets, config.sharpness, config.anchor_weight)
        if config.fluency_weight:
            rows = targets if config.fluency_rows == "target" else None
            loss = loss + config.fluency_weight * fluency_kl(logprobs, batch, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append((loss.item(), hits.item()))
        if step % config.logging_steps == 0 or step == config.steps:
            entry = {"step": step, "loss": round(sum(w[0] for w in window) / len(window), 4),
                     "target_top": round(sum(w[1] for w in window) / len(window), 3)}
            log.append(entry)
            bar.set_postfix(loss=entry["loss"], top=entry["target_top"])
            logger.info("step %d: loss %.4f, target level on top %.3f", step, entry["loss"], entry["target_top"])
            window = []
    return ({n: p.detach() for n, p in center.items()},
            {d: {n: p.detach() for n, p in v.items()} for d, v in vectors.items()}, log)


def _full_name(head_name: str, n_layers: int, k: int) -> str:
    if head_name.startswith("layers."):
        i, rest = head_name[len("layers."):].split(".", 1)
        return f"model.layers.{n_layers - k + int(i)}.{rest}"
    return f"model.{head_name}"


def _set(model, weights: Dict[str, "torch.Tensor"]) -> None:  # noqa: F821
    import torch

    state = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            state[n].copy_(w)


def train_composed(base: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                   domains: Sequence[str], config: Optional[ComposedTrainConfig] = None, force: bool = False) -> Path:
    """``meav train-composed``: write ``out/centered`` (a model) and ``out/vectors/<domain>``
    (alignment vectors relative to it), all at once or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meav_merge.data.schema import read_jsonl
    from meav_merge.training.trunk import split_model
    from meav_merge.vectors.alignment_vector import extract_vector

    config = config or ComposedTrainConfig()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to retrain)")
    if len(set(domains)) != len(domains) or len(domains) < 2:
        raise ValueError("--domains: give at least two different domains")
    files = sorted({f for d in domains for f in resolve_data_files(data, d)})
    for f in files:
        read_jsonl(f)  # a bad file stops here, naming file:line
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, use_safetensors=True)
    queries = {}
    for d in domains:
        # by id, so the draw order (and the vectors) do not depend on the file's record order
        recs = sorted(load_records(data, d, "train"), key=lambda r: r.id)[: config.train_records or None]
        queries[d] = _queries(tok, recs, config.max_length)
        if len(queries[d]) < config.queries_per_domain:
            raise ValueError(f"{d}: only {len(queries[d])} usable train records")
    _, head = split_model(model, config.trainable_layers)  # raises for a layout it cannot split exactly
    started = time.time()
    draws = _draws(queries, config)
    used = {id(q): q for _, batch, _ in draws for q in batch}.values()
    head.model.embed_tokens.warm([(q.context, q.rows) for q in used])
    if config.fluency_weight:
        attach_reference(head, {}, list(used), config.fluency_top_k)  # {}: the head's own (base) weights
    setup = time.time() - started
    center, vectors, log = _optimize(head, queries, draws, config)
    n, k = model.config.num_hidden_layers, config.trainable_layers
    base_w = {_full_name(h, n, k): p.detach().clone() for h, p in head.model.named_parameters()
              if h in center}
    provenance = {"trainer": "meav_merge.training.composed", **config.to_dict(), "domains": list(domains),
                  "base": str(base), "data": {"files": [str(f) for f in files], "file_sha256": file_sha256(files),
                                               "train_queries": {d: len(q) for d, q in queries.items()}},
                  "setup_seconds": round(setup, 1), "train_seconds": round(time.time() - started - setup, 1),
                  "log": log}
    with atomic_output_dir(out, force=force) as tmp:
        _set(model, {f: base_w[f] + center[h] for h in center for f in [_full_name(h, n, k)]})
        model.save_pretrained(str(tmp / "centered"), safe_serialization=True)
        tok.save_pretrained(str(tmp / "centered"))
        copy_model_files(base, tmp / "centered", ["generation_config.json"])
        for d, delta in vectors.items():
            scratch = tmp / f".aligned-{d}"
            _set(model, {f: base_w[f] + center[h] + delta[h] for h in center for f in [_full_name(h, n, k)]})
            model.save_pretrained(str(scratch), safe_serialization=True)
            extract_vector(scratch, tmp / "centered", tmp / "vectors" / d, meta={
                "base": str(out / "centered"), "aligned": None, "domain": d,
                "preference": "λ = +1 expert, 0 generic, -1 avoidance (composed with the other domains)",
                "training": provenance})
            shutil.rmtree(scratch)
        (tmp / "train_metrics.json").write_text(json.dumps(provenance, indent=2))
    return out
