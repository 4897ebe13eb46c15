"""Scoring when only the top layers change: the bottom stack runs once per text, every λ reuses it."""

from __future__ import annotations

import copy
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from meav_merge.evaluation.scoring import packed_logprobs, token_logprobs
from meav_merge.layers import SUPPORTED_MODEL_TYPES, cache_arg, kv_cache, sliding_window, sub_model

LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")  # a decoder layer's tensor, and its index


def top_layer_scorer(model, changing: Sequence[str]) -> Optional["TopLayerScorer"]:
    """A ``TopLayerScorer`` when every changing tensor is in the top layers or the final norm, else None."""
    if (getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES or not changing
            or sliding_window(model.config)):  # packed responses (evaluation.packed) need full attention
        return None
    n = model.config.num_hidden_layers
    lowest = n
    for name in changing:
        m = LAYER_NAME.match(name)
        if m:
            lowest = min(lowest, int(m.group(1)))
        elif not name.startswith("model.norm."):
            return None  # embeddings / LM head change: every layer's input changes
    k = n - lowest
    return TopLayerScorer(model, k) if 0 < k < n else None


class TopLayerScorer:
    """Token-mean response log-probs when only the top ``k`` layers and the final norm change.

    Vectors trained with the CPU preset leave the bottom layers untouched, so the input
    of layer L−k for each context and response is the same at every λ: it is computed
    once and kept, and each call runs only the top k layers and the LM head. Each
    query's context goes through the top layers once; its responses continue from that
    KV cache, packed end to end (``evaluation.packed``) so nothing is spent on padding. Exact,
    not an approximation: the same function as the full forward pass, on the model's
    own (shared) parameters, so re-weighting the model in place is seen here.
    """

    def __init__(self, model, k: int, rows_per_batch: int = 12):
        n = model.config.num_hidden_layers
        self.model, self.k, self.rows_per_batch = model, k, rows_per_batch
        self.trunk = sub_model(model, 0, n - k, nn.Identity())
        self.top = sub_model(model, n - k, k, model.model.norm)
        # (context, continuations) -> trunk output for the context and for each response's inputs
        self.states: Dict[tuple, Tuple[torch.Tensor, List[torch.Tensor]]] = {}

    @torch.no_grad()
    def _trunk_states(self, q) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        key = (tuple(q.context_ids), tuple(tuple(c) for c in q.continuations))
        if key not in self.states:
            out = self.trunk(input_ids=torch.tensor([q.context_ids]), use_cache=True)
            # a response's inputs are its tokens but the last (which nothing after it predicts)
            resp = [self.trunk(input_ids=torch.tensor([c[:-1]]), **{cache_arg(): copy.deepcopy(kv_cache(out))},
                               use_cache=True).last_hidden_state[0] if len(c) > 1 else out.last_hidden_state[0, :0]
                    for c in q.continuations]
            self.states[key] = (out.last_hidden_state[0], resp)
        return self.states[key]

    def local_name(self, name: str) -> str:
        """A model tensor's name inside ``self.top`` (layers renumbered from 0, the final norm as ``norm``)."""
        m = LAYER_NAME.match(name)
        if m:
            n = self.model.config.num_hidden_layers
            return f"layers.{int(m.group(1)) - (n - self.k)}." + name[m.end():]
        return name.removeprefix("model.")

    def scores_with(self, params: Dict[str, torch.Tensor], queries) -> torch.Tensor:
        """[queries, levels] token-mean log-probs with the top stack's tensors replaced by ``params``
        (names from ``local_name``), differentiable in them: one padded row per response."""
        rows = []
        for q in queries:
            ctx, resp = self._trunk_states(q)
            seqs = [torch.cat([ctx, r]) for r in resp]
            width = max(len(s) for s in seqs)
            emb = torch.zeros(len(seqs), width, ctx.shape[-1], dtype=ctx.dtype)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for j, s in enumerate(seqs):
                emb[j, : len(s)], mask[j, : len(s)] = s, 1
            hidden = functional_call(self.top, params, args=(),
                                     kwargs=dict(inputs_embeds=emb, attention_mask=mask, use_cache=False)
                                     ).last_hidden_state
            lc = len(q.context_ids)
            row = []
            for j, c in enumerate(q.continuations):
                # position lc−1+t predicts continuation token t
                lp = token_logprobs(self.model.lm_head, hidden[j, lc - 1: lc - 1 + len(c)], torch.tensor(c))
                row.append(lp[q.n_whitespace:].mean())
            rows.append(torch.stack(row))
        return torch.stack(rows)

    @torch.no_grad()
    def score(self, queries, pad_id: int = 0) -> List[List[float]]:
        states = [self._trunk_states(q) for q in queries]
        lc = [len(q.context_ids) for q in queries]
        width_c, d = max(lc), states[0][0].shape[-1]
        ctx = torch.zeros(len(queries), width_c, d, dtype=states[0][0].dtype)
        ctx_mask = torch.zeros(len(queries), width_c, dtype=torch.long)
        for i, (h, _) in enumerate(states):
            ctx[i, : lc[i]], ctx_mask[i, : lc[i]] = h, 1
        out = self.top(inputs_embeds=ctx, attention_mask=ctx_mask, use_cache=True)
        # every response row: (query, its tokens, trunk states of its inputs)
        rows = [(qi, c, states[qi][1][ci]) for qi, q in enumerate(queries) for ci, c in enumerate(q.continuations)]
        owner = torch.tensor([qi for qi, _, _ in rows])
        last = out.last_hidden_state[owner, torch.tensor(lc)[owner] - 1]  # predicts each response's first token
        logps = [[lp] for lp in token_logprobs(self.model.lm_head, last, torch.tensor([c[0] for _, c, _ in rows])).tolist()]
        # the rest of each response: packed end to end, ``rows_per_batch`` responses to a row
        longer = [r for r in range(len(rows)) if len(rows[r][2])]
        for s in range(0, len(longer), self.rows_per_batch):
            batch = longer[s:s + self.rows_per_batch]
            got = packed_logprobs(self.top, self.model.lm_head, [rows[r][2] for r in batch],
                                  [rows[r][1][1:] for r in batch], [rows[r][0] for r in batch], lc, kv_cache(out))
            for r, lps in zip(batch, got):
                logps[r].extend(lps)
        scores, r = [], 0
        for q in queries:
            scores.append([float(torch.tensor(logps[r + i], dtype=torch.float64)[q.n_whitespace:].mean())
                           for i in range(len(q.continuations))])
            r += len(q.continuations)
        return scores
