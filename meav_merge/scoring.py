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

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from meav_merge.data import Record


def chat_context(tokenizer, query: str, system: Optional[str] = None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": query}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # Base models without a template: a plain transcript.
    return (f"{system}\n\n" if system else "") + f"Question: {query}\nAnswer:"


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


@torch.no_grad()
def _score_query(model, q: PreparedQuery, pad_id: int) -> List[float]:
    device = next(model.parameters()).device
    ctx = torch.tensor([q.context_ids], device=device)
    out = model(input_ids=ctx, use_cache=True)
    first_logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache = out.past_key_values
    n = len(q.continuations)
    if n > 1:
        cache.batch_repeat_interleave(n)
    width = max(len(c) for c in q.continuations)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, len(q.context_ids) + width), dtype=torch.long, device=device)
    mask[:, : len(q.context_ids)] = 1
    for i, c in enumerate(q.continuations):
        ids[i, : len(c)] = torch.tensor(c, device=device)
        mask[i, len(q.context_ids): len(q.context_ids) + len(c)] = 1
    # Only positions 0..width-2 predict a continuation token; the last logit is never used.
    logits = None
    if width > 1:
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], past_key_values=cache,
                       use_cache=False).logits
    scores = []
    for i, c in enumerate(q.continuations):
        token_logps = [first_logp[c[0]]]
        if len(c) > 1:
            lp = torch.log_softmax(logits[i, : len(c) - 1].float(), dim=-1)
            token_logps.extend(lp.gather(1, torch.tensor(c[1:], device=device)[:, None])[:, 0])
        own = torch.stack(token_logps)[q.n_whitespace:]
        scores.append(float(own.double().mean()))
    return scores


def mean_logprobs(model, tokenizer, prepared: Sequence[PreparedQuery], progress: bool = True,
                  desc: str = "score") -> List[List[float]]:
    """Token-mean log-probability of each response, per query (levels in record order)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    return [_score_query(model, q, pad) for q in tqdm(prepared, desc=desc, disable=not progress, leave=False)]


def preference_accuracy(scores: Sequence[Sequence[float]], levels: Sequence[str]) -> Dict[str, float]:
    """Fraction of queries whose highest-scoring response is at each level (sums to 1)."""
    wins = {lv: 0 for lv in levels}
    for row in scores:
        wins[levels[max(range(len(row)), key=lambda i: row[i])]] += 1
    n = max(1, len(scores))
    return {lv: wins[lv] / n for lv in levels}


def winners(scores: Sequence[Sequence[float]], levels: Sequence[str]) -> List[str]:
    return [levels[max(range(len(row)), key=lambda i: row[i])] for row in scores]


def dominant(fractions: Dict[str, float]) -> Optional[str]:
    """The paper's 'dominant' level: the highest fraction, and above 1/3 (for 3 levels: chance)."""
    level = max(fractions, key=fractions.get)
    return level if fractions[level] > 1.0 / len(fractions) else None
