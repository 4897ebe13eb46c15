"""Preference accuracy (MEAV paper, Eq. 4): which response has the highest token-mean log-probability.

For a query q the context is the chat-formatted query (generation prompt included);
each candidate response r is scored by the mean log-probability of its own tokens.
Tokenization follows lm-eval's HF backend exactly (``_encode_pair``: trailing
whitespace of the context moves into the continuation, the continuation is the
tail of encode(context + continuation)); the moved whitespace tokens are then left
out of the mean, so the number is the paper's and the lm-eval task gives the same.

The three responses of a query share one forward pass over the context: its KV
cache is computed once and every continuation reads it; on the decoder layouts
``layers`` knows, the continuations run packed end to end in one row (``packed``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from meav_merge.data.schema import Record
from meav_merge.layers import SUPPORTED_MODEL_TYPES, cache_arg, kv_cache, sliding_window


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


def token_logprobs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   vocab_slice: int = 4096) -> torch.Tensor:
    """log p(target) at each position of ``hidden`` (positions, hidden size), differentiable.

    The logits exist one vocabulary slice at a time, (positions, ``vocab_slice``): each slice's
    logsumexp and target logit are kept and the slice freed. On CPU this ran at the LM head's bare
    matmul speed, 15% faster than one (positions, vocab) cross-entropy over the same positions
    (0.49 against 0.58 s for 1024 positions of SmolLM2's 49k vocabulary), with 12x less memory."""
    if not isinstance(lm_head, nn.Linear) or _has_hooks(lm_head) or len(hidden) == 0:
        # through the module, so a hook on it (AWOT steers the LM head's input with one) is seen
        return -nn.functional.cross_entropy(lm_head(hidden).float(), targets, reduction="none")
    weight, bias = lm_head.weight, lm_head.bias
    lse = picked = None
    for lo in range(0, weight.shape[0], vocab_slice):
        hi = min(lo + vocab_slice, weight.shape[0])
        logits = nn.functional.linear(hidden, weight[lo:hi], None if bias is None else bias[lo:hi]).float()
        part = torch.logsumexp(logits, dim=-1)
        lse = part if lse is None else torch.logaddexp(lse, part)
        here = logits.gather(1, (targets - lo).clamp(0, hi - lo - 1)[:, None])[:, 0]
        picked = torch.where((targets >= lo) & (targets < hi), here, 0.0 if picked is None else picked)
    return picked - lse


def _has_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as torch_module

    return bool(module._forward_pre_hooks or module._forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_forward_hooks)


def _head_is_linear(model) -> bool:
    """The logits are the LM head's linear map of the decoder's last hidden state, nothing after it
    (no soft-capping or logit scale), so log-probs can be taken at the response positions alone."""
    return (getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES
            and isinstance(getattr(model, "lm_head", None), nn.Linear) and hasattr(model, "model"))


def _logprobs_at(model, direct: bool, out, rows: torch.Tensor, cols: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) at positions (rows, cols) of a forward's output: from the hidden states through
    ``token_logprobs`` when ``direct``, else from the full model's logits."""
    if direct:
        return token_logprobs(model.lm_head, out.last_hidden_state[rows, cols], targets)
    return -nn.functional.cross_entropy(out.logits[rows, cols].float(), targets, reduction="none")


def _shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence starts with, leaving each at least one token of its own."""
    n, limit = 0, min(len(x) for x in seqs) - 1
    while n < limit and all(x[n] == seqs[0][n] for x in seqs):
        n += 1
    return n


def _context_pass(body, direct: bool, queries: Sequence[PreparedQuery], pad_id: int, device):
    """Run the contexts (right-padded to the longest) keeping their KV cache: (output, keep, offset).
    The prefix every context shares (the chat template's system turn: 24 of ~150 tokens for SmolLM2)
    runs once and its cache is repeated across the batch; ``offset`` is its length, so the output's
    position ``i`` is context position ``offset + i``. ``keep``: the context positions whose logits
    the full model returns (each context's last, which predicts a response's first token)."""
    lc = [len(q.context_ids) for q in queries]
    width_c = max(lc)
    ctx = torch.full((len(queries), width_c), pad_id, dtype=torch.long, device=device)
    ctx_mask = torch.zeros_like(ctx)
    for i, q in enumerate(queries):
        ctx[i, : lc[i]] = torch.tensor(q.context_ids, device=device)
        ctx_mask[i, : lc[i]] = 1
    offset = _shared_prefix([q.context_ids for q in queries]) if len(queries) > 1 else 0
    extra = {}
    if offset:
        shared = kv_cache(body(input_ids=ctx[:1, :offset], use_cache=True))
        shared.batch_repeat_interleave(len(queries))
        pos = torch.arange(offset, width_c, device=device)[None].expand(len(queries), -1)
        extra = {cache_arg(): shared, "position_ids": pos}
    keep = sorted(set(n - 1 - offset for n in lc))
    if not direct:
        extra["logits_to_keep"] = torch.tensor(keep, device=device)
    out = body(input_ids=ctx[:, offset:], attention_mask=ctx_mask, use_cache=True, **extra)
    return out, keep, offset


PACKED_ROW_TOKENS = 4096  # responses per packed row, in tokens: bounds the LM head's (tokens, slice) logits


@torch.no_grad()
def _score_batch(model, queries: Sequence[PreparedQuery], pad_id: int) -> List[List[float]]:
    """Score several queries at once: contexts run once (``_context_pass``), then every response
    continues from its own context's KV cache with positions numbered on from the context's true
    length, so each sees exactly its own context, as in a separate forward pass. Decoders whose
    logits are a linear head take log-probs at response positions only, and with full attention run
    the responses packed in one row (``packed``); other models run padded batches of similar length
    (``length_groups``)."""
    device = next(model.parameters()).device
    direct = _head_is_linear(model)
    body = model.model if direct else model
    lc = [len(q.context_ids) for q in queries]
    out, keep, offset = _context_pass(body, direct, queries, pad_id, device)
    rows = [(qi, c) for qi, q in enumerate(queries) for c in q.continuations]
    owner = [qi for qi, _ in rows]
    last = torch.tensor([lc[qi] - 1 - offset if direct else keep.index(lc[qi] - 1 - offset) for qi in owner],
                        device=device)
    first = _logprobs_at(model, direct, out, torch.tensor(owner, device=device), last,
                         torch.tensor([c[0] for _, c in rows], device=device))
    token_logps: List[List[float]] = [[lp] for lp in first.tolist()]
    longer = [r for r, (_, c) in enumerate(rows) if len(c) > 1]
    packed = direct and sliding_window(model.config) is None
    continue_rows = _packed_rows if packed else _padded_rows
    for r, logps in continue_rows(model, body, direct, kv_cache(out), rows, longer, lc, pad_id, device):
        token_logps[r].extend(logps)
    scores: List[List[float]] = [[] for _ in queries]
    for (qi, _), logps in zip(rows, token_logps):
        own = torch.tensor(logps[queries[qi].n_whitespace:], dtype=torch.float64)
        scores[qi].append(float(own.mean()))
    return scores


def packed_logprobs(body, lm_head: nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[Sequence[int]],
                    owners: Sequence[int], context_lengths: Sequence[int], cache) -> List[List[float]]:
    """log p of each response's ``targets``, its ``inputs`` (ids or embeddings) run packed end to end
    in one row over its own context's KV cache (``evaluation.packed.packed_hidden``)."""
    from meav_merge.evaluation.packed import packed_hidden

    hidden = packed_hidden(body, inputs, owners, context_lengths, cache)
    got = iter(token_logprobs(lm_head, hidden, torch.tensor([t for ts in targets for t in ts],
                                                            device=hidden.device)).tolist())
    return [list(itertools.islice(got, len(ts))) for ts in targets]


def _packed_rows(model, body, direct: bool, cache, rows, which: Sequence[int], lc, pad_id: int, device):
    """(row, log-probs of its tokens after the first) for the responses ``which``, packed end to end,
    at most ``PACKED_ROW_TOKENS`` to a row."""
    chunks: List[List[int]] = [[]]
    tokens = 0
    for r in which:
        n = len(rows[r][1]) - 1
        if chunks[-1] and tokens + n > PACKED_ROW_TOKENS:
            chunks.append([])
            tokens = 0
        chunks[-1].append(r)
        tokens += n
    for chunk in (c for c in chunks if c):
        got = packed_logprobs(body, model.lm_head, [torch.tensor(rows[r][1][:-1]) for r in chunk],
                              [rows[r][1][1:] for r in chunk], [rows[r][0] for r in chunk], lc, cache)
        yield from zip(chunk, got)


def _padded_rows(model, body, direct: bool, cache, rows, which: Sequence[int], lc, pad_id: int, device):
    """``_packed_rows`` for any causal LM: padded batches of similar length."""
    width_c = max(lc)
    for group in length_groups([len(rows[r][1]) for r in which]):
        group = [which[g] for g in group]
        n_in = [len(rows[r][1]) - 1 for r in group]  # a response's inputs: its tokens but the last
        ids = torch.full((len(group), max(n_in)), pad_id, dtype=torch.long, device=device)
        for j, r in enumerate(group):
            ids[j, : n_in[j]] = torch.tensor(rows[r][1][:-1], device=device)
        own_cache = copy.deepcopy(cache)
        own_cache.reorder_cache(torch.tensor([rows[r][0] for r in group], device=device))  # each row's own context
        pos, mask = continuation_layout([lc[rows[r][0]] for r in group], n_in, width_c, device)
        step = body(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_arg(): own_cache}, use_cache=False)
        at = torch.tensor([(j, t) for j, n in enumerate(n_in) for t in range(n)], device=device)
        targets = torch.tensor([t for r in group for t in rows[r][1][1:]], device=device)
        got = iter(_logprobs_at(model, direct, step, at[:, 0], at[:, 1], targets).tolist())
        for r, n in zip(group, n_in):
            yield r, list(itertools.islice(got, n))


def mean_logprobs(model, tokenizer, prepared: Sequence[PreparedQuery], progress: bool = True,
                  desc: str = "score", batch_size: int = 4, scorer=None) -> List[List[float]]:
    """Token-mean log-probability of each response, per query (levels in record order).

    ``scorer`` (a ``trunk.TopLayerScorer``) reuses the frozen bottom layers' states
    between calls; without it every call runs the full model."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    window = sliding_window(model.config)
    if window and any(len(q.context_ids) + max(map(len, q.continuations)) > window for q in prepared):
        batch_size = 1  # a window's cache of right-padded contexts would hold padding instead of their tokens
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
