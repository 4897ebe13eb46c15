"""Preference accuracy (MEAV paper, Eq. 4): which response has the highest token-mean log-probability.

For a query q the context is the chat-formatted query (generation prompt included);
each candidate response r is scored by the mean log-probability of its own tokens.
Tokenization follows lm-eval's HF backend exactly (``_encode_pair``: trailing
whitespace of the context moves into the continuation, the continuation is the
tail of encode(context + continuation)); the moved whitespace tokens are then left
out of the mean, so the number is the paper's and the lm-eval task gives the same.

The three responses of a query share one forward pass over the context: its KV
cache is computed once and repeated across the batch of continuations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from meav_merge.data.schema import Record
from meav_merge.layers import cache_arg, kv_cache


def chat_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """The model's chat template up to the assistant's turn. A base model without a template
    gets a plain transcript ("User: ...\n\nAssistant:"); scoring, generation and synthesis
    all prompt through here, so they agree on it."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"


def chat_context(tokenizer, query: str, system: Optional[str] = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
    return chat_prompt(tokenizer, messages)


def tok_encode(tokenizer, string: str, add_bos_token: Optional[bool] = None) -> List[int]:
    """lm-eval HFLM.tok_encode: tokenizer defaults, but no second BOS when the text starts with one."""
    kwargs = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_bos_token is None and bos is not None:
        prefix = tokenizer.decode([bos])
        if prefix and string.startswith(prefix):
            kwargs["add_special_tokens"] = False
    return tokenizer.encode(string, **kwargs)


def encode_pair(tokenizer, context: str, continuation: str,
                add_bos_token: Optional[bool] = None) -> Tuple[List[int], List[int]]:
    """lm-eval ``_encode_pair`` for causal models."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation, add_bos_token)
    ctx = tok_encode(tokenizer, context, add_bos_token)
    return ctx, whole[len(ctx):]


@dataclass
class PreparedQuery:
    record_id: str
    levels: Tuple[str, ...]
    context_ids: List[int]
    continuations: List[List[int]]  # moved whitespace + response tokens, per level
    n_whitespace: int  # leading continuation tokens that are the context's moved whitespace


def prepare(tokenizer, records: Sequence[Record], system: Optional[str] = None,
            add_bos_token: Optional[bool] = None, levels: Optional[Sequence[str]] = None) -> List[PreparedQuery]:
    out = []
    for r in records:
        ctx_text = chat_context(tokenizer, r.query, system)
        lv = tuple(levels or r.levels)
        ctx_ids, ws = encode_pair(tokenizer, ctx_text, "", add_bos_token)
        conts = []
        for level in lv:
            c_ids, cont = encode_pair(tokenizer, ctx_text, r.responses[level], add_bos_token)
            if c_ids != ctx_ids or cont[: len(ws)] != ws:
                raise ValueError(f"{r.source or r.id}: tokenization of the context changes with the response; "
                                 "cannot share the prefix")
            if len(cont) <= len(ws):
                raise ValueError(f"{r.source or r.id}: response '{level}' has no tokens")
            conts.append(cont)
        out.append(PreparedQuery(r.id, lv, ctx_ids, conts, len(ws)))
    return out


def continuation_layout(context_lengths: Sequence[int], lengths: Sequence[int], width_c: int,
                        device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Position ids and attention mask for rows that continue from a KV cache of right-padded
    contexts ``width_c`` wide: row r sees the first ``context_lengths[r]`` cached positions and
    its own ``lengths[r]`` tokens, numbered on from its context's true length."""
    width = max(lengths)
    pos = torch.tensor(context_lengths, device=device)[:, None] + torch.arange(width, device=device)
    mask = torch.zeros((len(lengths), width_c + width), dtype=torch.long, device=device)
    for r, (lc, n) in enumerate(zip(context_lengths, lengths)):
        mask[r, :lc] = 1
        mask[r, width_c: width_c + n] = 1
    return pos, mask


def length_groups(lengths: Sequence[int], slack: float = 1.5) -> List[List[int]]:
    """Indices of ``lengths`` in ascending-length groups, each at most ``slack`` times as wide as its
    shortest member: one padded batch of every response wasted ~37% of its token passes here (a
    query's avoidance answer is often a third of its expert answer's length)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: List[List[int]] = []
    for i in order:
        if groups and lengths[i] <= slack * max(1, lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def _score_batch(model, queries: Sequence[PreparedQuery], pad_id: int) -> List[List[float]]:
    """Score several queries at once: contexts run once (right-padded, KV kept), then every
    response of every query continues from its own context, in batches of similar length
    (``length_groups``). Padding holes are masked and positions continue from each context's
    true length, so each row sees exactly its own context, as in a separate forward pass."""
    device = next(model.parameters()).device
    lc = [len(q.context_ids) for q in queries]
    width_c = max(lc)
    ctx = torch.full((len(queries), width_c), pad_id, dtype=torch.long, device=device)
    ctx_mask = torch.zeros_like(ctx)
    for i, q in enumerate(queries):
        ctx[i, : lc[i]] = torch.tensor(q.context_ids, device=device)
        ctx_mask[i, : lc[i]] = 1
    # Only each context's last position predicts a response token: skip the other logits.
    keep = sorted(set(n - 1 for n in lc))
    out = model(input_ids=ctx, attention_mask=ctx_mask, use_cache=True,
                logits_to_keep=torch.tensor(keep, device=device))
    last = torch.stack([out.logits[i, keep.index(lc[i] - 1)] for i in range(len(queries))]).float()
    first_logp = torch.log_softmax(last, dim=-1)
    rows = [(qi, c) for qi, q in enumerate(queries) for c in q.continuations]
    token_logps: List[List[torch.Tensor]] = [[first_logp[qi, c[0]]] for qi, c in rows]
    longer = [r for r, (_, c) in enumerate(rows) if len(c) > 1]
    for group in length_groups([len(rows[r][1]) for r in longer]):
        group = [longer[g] for g in group]
        width = max(len(rows[r][1]) for r in group) - 1
        ids = torch.full((len(group), width), pad_id, dtype=torch.long, device=device)
        for j, r in enumerate(group):
            c = rows[r][1]
            ids[j, : len(c) - 1] = torch.tensor(c[:-1], device=device)
        cache = copy.deepcopy(kv_cache(out))
        cache.reorder_cache(torch.tensor([rows[r][0] for r in group], device=device))  # each row's own context
        pos, mask = continuation_layout([lc[rows[r][0]] for r in group], [len(rows[r][1]) - 1 for r in group],
                                        width_c, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_arg(): cache},
                       use_cache=False).logits
        for j, r in enumerate(group):
            c = rows[r][1]
            lp = torch.log_softmax(logits[j, : len(c) - 1].float(), dim=-1)
            token_logps[r].extend(lp.gather(1, torch.tensor(c[1:], device=device)[:, None])[:, 0])
    scores: List[List[float]] = [[] for _ in queries]
    for (qi, _), logps in zip(rows, token_logps):
        own = torch.stack(logps)[queries[qi].n_whitespace:]
        scores[qi].append(float(own.double().mean()))
    return scores


def mean_logprobs(model, tokenizer, prepared: Sequence[PreparedQuery], progress: bool = True,
                  desc: str = "score", batch_size: int = 4, scorer=None) -> List[List[float]]:
    """Token-mean log-probability of each response, per query (levels in record order).

    ``scorer`` (a ``trunk.TopLayerScorer``) reuses the frozen bottom layers' states
    between calls; without it every call runs the full model."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    score_batch = scorer.score if scorer is not None else (lambda chunk, pad_id: _score_batch(model, chunk, pad_id))
    out: List[List[float]] = []
    with tqdm(total=len(prepared), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            out.extend(score_batch(chunk, pad))
            bar.update(len(chunk))
    return out


def winners(scores: Sequence[Sequence[float]], levels: Sequence[str]) -> List[str]:
    """The level of each query's highest-scoring response (MEAV Eq. 4; the first on a tie)."""
    return [levels[max(range(len(row)), key=row.__getitem__)] for row in scores]


def preference_accuracy(scores: Sequence[Sequence[float]], levels: Sequence[str]) -> Dict[str, float]:
    """Fraction of queries whose highest-scoring response is at each level (sums to 1)."""
    won = winners(scores, levels)
    n = max(1, len(won))
    return {lv: won.count(lv) / n for lv in levels}


def dominant(fractions: Dict[str, float]) -> Optional[str]:
    """The paper's 'dominant' level: the highest fraction, and above 1/3 (for 3 levels: chance).

    A tie for the highest is no dominant level: on small n (0.417 / 0.417 at n = 12) the level
    listed first would otherwise win by dict order."""
    level = max(fractions, key=fractions.get)
    top = fractions[level]
    if top <= 1.0 / len(fractions) or sum(1 for v in fractions.values() if v == top) > 1:
        return None
    return level
