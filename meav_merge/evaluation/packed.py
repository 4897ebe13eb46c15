"""Responses packed end to end in one row: no padding, and the widest matmuls this CPU runs.

Scoring runs each query's context once and continues every response from that context's KV
cache. Batching responses of different lengths as padded rows spent 13.5% of the token passes
on padding (bench/score.py), and grouping them by length to cut it made the matmuls narrower
and no faster. Here all responses of a batch lie in one row (the linear layers see every real
token and nothing else) and only attention is done per response: its queries see its own
context's cached keys and its own earlier tokens. It is registered with transformers as an
attention implementation and switched on only for the packed forward (``packed_attention_on``).
Full attention only: a sliding-window model keeps only the window in its KV cache, so scoring
runs it the padded way (``layers.sliding_window``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch
import torch.nn.functional as F

IMPLEMENTATION = "meav_packed"


@dataclass
class PackedLayout:
    """Where each response sits in the packed row and which context it continues."""

    cache: object  # the contexts' KV cache (one batch row per context), as the context pass returned it
    segments: List[Tuple[int, int, int, int]]  # (start in the row, length, context row, context length)


def pack(lengths: Sequence[int], owners: Sequence[int], context_lengths: Sequence[int],
         cache) -> Tuple[torch.Tensor, PackedLayout]:
    """Position ids (1, total) for responses of ``lengths`` laid end to end, each numbered on from its
    own context's true length, and the layout ``packed_attention`` reads."""
    segments, pos, start = [], [], 0
    for n, owner in zip(lengths, owners):
        lc = context_lengths[owner]
        segments.append((start, n, owner, lc))
        pos.append(torch.arange(lc, lc + n))
        start += n
    return torch.cat(pos)[None], PackedLayout(cache, segments)


def packed_hidden(body, inputs: Sequence[torch.Tensor], owners: Sequence[int], context_lengths: Sequence[int],
                  cache) -> torch.Tensor:
    """Last hidden states (total, hidden size) of responses continuing their contexts in ``cache``:
    ``inputs`` are each response's input ids (1-D) or input embeddings (2-D), ``owners`` the context
    row each continues, ``body`` the decoder stack that produced ``cache``."""
    pos, layout = pack([len(x) for x in inputs], owners, context_lengths, cache)
    row = torch.cat(list(inputs))[None].to(next(body.parameters()).device)
    with packed_attention_on(body):
        out = body(**{"inputs_embeds" if row.dim() == 3 else "input_ids": row}, position_ids=pos.to(row.device),
                   use_cache=False, meav_layout=layout)
    return out.last_hidden_state[0]


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     scaling=None, dropout: float = 0.0, meav_layout: PackedLayout = None, **kwargs):
    """transformers' attention interface: query (1, heads, total, dim), key/value the packed row's
    own (1, kv heads, total, dim); returns (1, total, heads, dim). A call without a layout (anything
    else run while the implementation is on) goes to SDPA unchanged."""
    if meav_layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    cached = meav_layout.cache.layers[module.layer_idx]
    out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for start, n, owner, lc in meav_layout.segments:
        own = slice(start, start + n)
        k = torch.cat([cached.keys[owner:owner + 1, :, :lc], key[:, :, own]], dim=2)
        v = torch.cat([cached.values[owner:owner + 1, :, :lc], value[:, :, own]], dim=2)
        # position i sees the whole context and its own tokens up to i
        mask = torch.ones(n, lc + n, dtype=torch.bool, device=query.device).tril(lc)
        o = F.scaled_dot_product_attention(query[:, :, own], k, v, attn_mask=mask, scale=scaling,
                                           enable_gqa=k.shape[1] != query.shape[1])
        out[:, own] = o.transpose(1, 2)
    return out, None


def _no_mask(*args, **kwargs):
    return None  # packed_attention builds each response's mask itself


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, packed_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


@contextlib.contextmanager
def packed_attention_on(*modules) -> Iterator[None]:
    """Switch every config reachable from ``modules`` to ``packed_attention`` for the duration;
    the attention implementations they had are restored after, on error too. The switch is on the
    model's config, so not for a model another thread runs meanwhile (scoring runs in one thread)."""
    _register()
    configs = {id(c): c for m in modules for sub in m.modules() if (c := getattr(sub, "config", None)) is not None}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = IMPLEMENTATION
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
