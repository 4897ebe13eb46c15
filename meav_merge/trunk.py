"""Frozen-trunk training: when only the top k layers train, compute the rest once.

DPO on CPU is dominated by forward passes through layers that never change. Here the
model is split at layer L−k: a *trunk* (embeddings + bottom layers, frozen) and a
*head* (top k layers + final norm + LM head) that is an ordinary Hugging Face causal
LM of k layers, which trl's DPOTrainer trains as usual. The head's token embedding is
replaced by ``TrunkEmbedding``, which returns the trunk's hidden states for the
sequence, computed once per distinct sequence and cached: the reference log-prob pass
fills the cache and every training step reuses it.

This is exact, not an approximation: the head computes the same function as the top
of the full model (checked numerically by ``split_model`` before use). It applies to
decoder stacks whose forward is ``embed → layers → norm → lm_head`` with no embedding
scaling (Llama, Mistral, Qwen2/3 layouts); other models train through plain trl.
"""

from __future__ import annotations

import copy
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from meav_merge.scoring import continuation_layout

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class TrunkEmbedding(nn.Module):
    """Maps token ids to the frozen trunk's output (the input of layer L−k), with a cache."""

    def __init__(self, trunk: nn.Module, weight: nn.Parameter):
        super().__init__()
        self.weight = weight  # kept so the LM head can stay tied to it; frozen
        object.__setattr__(self, "_trunk", trunk)  # not a submodule: never trained, never saved
        self.cache: Dict[bytes, torch.Tensor] = {}
        self.lengths: Optional[torch.Tensor] = None  # real length of each row, set by a pre-hook
        self.hits = self.misses = 0
        # Known prompts: a prompt is shared by every pair of its record, so its trunk
        # states and KV cache are computed once and each completion continues from them.
        self._prefixes: Dict[int, set] = {}
        self._prefix_state: Dict[bytes, Tuple[torch.Tensor, object]] = {}

    def add_prefixes(self, prefixes) -> None:
        for p in prefixes:
            ids = torch.as_tensor(p, dtype=torch.long)
            self._prefixes.setdefault(len(ids), set()).add(ids.numpy().tobytes())

    def _known_prefix(self, ids: torch.Tensor) -> int:
        row = ids.cpu()
        for n in sorted(self._prefixes, reverse=True):
            if n < len(row) and row[:n].numpy().tobytes() in self._prefixes[n]:
                return n
        return 0

    @torch.no_grad()
    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        key = ids.cpu().numpy().tobytes()
        cached = self.cache.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        n = self._known_prefix(ids)
        if n:
            pkey = ids[:n].cpu().numpy().tobytes()
            if pkey not in self._prefix_state:
                out = self._trunk(input_ids=ids[None, :n], use_cache=True)
                self._prefix_state[pkey] = (out.last_hidden_state[0], out.past_key_values)
            h_prefix, kv = self._prefix_state[pkey]
            rest = self._trunk(input_ids=ids[None, n:], past_key_values=copy.deepcopy(kv), use_cache=True)
            cached = torch.cat([h_prefix, rest.last_hidden_state[0]])
        else:
            cached = self._trunk(input_ids=ids[None]).last_hidden_state[0]
        self.cache[key] = cached
        return cached

    @torch.no_grad()
    def warm(self, groups, batch_size: int = 8) -> None:
        """Fill the cache for many rows sharing prompts: each prompt's trunk runs once and
        its completions run as one batch continuing from the repeated KV cache."""
        from tqdm.auto import tqdm

        for prompt, rows in tqdm(groups, desc="trunk", unit="prompt", leave=False):
            rows = [r for r in dict.fromkeys(tuple(r) for r in rows) if r[: len(prompt)] == tuple(prompt)
                    and len(r) > len(prompt) and bytes(torch.tensor(r).numpy().tobytes()) not in self.cache]
            if not rows:
                continue
            p_ids = torch.tensor([prompt])
            out = self._trunk(input_ids=p_ids, use_cache=True)
            h_prompt = out.last_hidden_state[0]
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                tails = [r[len(prompt):] for r in chunk]
                width = max(len(t) for t in tails)
                ids = torch.full((len(chunk), width), 0, dtype=torch.long)
                mask = torch.zeros((len(chunk), len(prompt) + width), dtype=torch.long)
                mask[:, : len(prompt)] = 1
                for i, t in enumerate(tails):
                    ids[i, : len(t)] = torch.tensor(t)
                    mask[i, len(prompt): len(prompt) + len(t)] = 1
                kv = copy.deepcopy(out.past_key_values)
                kv.batch_repeat_interleave(len(chunk))
                h = self._trunk(input_ids=ids, attention_mask=mask, past_key_values=kv, use_cache=True).last_hidden_state
                for i, (r, t) in enumerate(zip(chunk, tails)):
                    self.cache[torch.tensor(r).numpy().tobytes()] = torch.cat([h_prompt, h[i, : len(t)]])

    def clear(self) -> None:
        self.cache.clear()
        self._prefix_state.clear()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        out = torch.zeros(b, t, self.weight.shape[1], dtype=self.weight.dtype, device=input_ids.device)
        lengths = self.lengths if self.lengths is not None and len(self.lengths) == b else torch.full((b,), t)
        # Rows are right-padded (trl's preference collator): the trunk of the real tokens
        # is all the head attends to; pad positions stay zero and are masked out.
        for i in range(b):
            n = int(lengths[i])
            out[i, :n] = self._hidden(input_ids[i, :n])
        return out


def _config_with_layers(config, n: int, start: int):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(config.layer_types)[start:start + n]
    return cfg


def split_model(model, k: int) -> Tuple[nn.Module, nn.Module]:
    """(trunk, head) for a causal LM whose top ``k`` layers will train.

    Raises ValueError when the model cannot be split exactly.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"frozen-trunk training does not support model_type '{config.model_type}'")
    n = config.num_hidden_layers
    if not 0 < k < n:
        raise ValueError(f"trainable_layers must be between 1 and {n - 1}")
    base = model.model
    # the trunk's output is the residual stream, not a normed state
    trunk = _sub_model(model, 0, n - k, nn.Identity()).requires_grad_(False)

    head = AutoModelForCausalLM.from_config(_config_with_layers(config, k, n - k))
    head.model.layers = nn.ModuleList(copy.deepcopy(base.layers[n - k:]))
    for i, layer in enumerate(head.model.layers):  # cache slots are indexed from 0 in the head
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = i
    head.model.norm = copy.deepcopy(base.norm)
    head.model.rotary_emb = base.rotary_emb
    embed_weight = base.embed_tokens.weight
    head.model.embed_tokens = TrunkEmbedding(trunk, embed_weight)
    head.lm_head = copy.deepcopy(model.lm_head) if not config.tie_word_embeddings else model.lm_head
    head.to(dtype=embed_weight.dtype)
    for p in head.parameters():
        p.requires_grad = False
    for p in list(head.model.layers.parameters()) + list(head.model.norm.parameters()):
        p.requires_grad = True

    def remember_lengths(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        head.model.embed_tokens.lengths = mask.sum(dim=1).cpu() if mask is not None else None

    head.model.register_forward_pre_hook(remember_lengths, with_kwargs=True)
    _check_exact(model, head)
    head.model.embed_tokens.cache.clear()
    return trunk, head


@torch.no_grad()
def _check_exact(model, head) -> None:
    ids = torch.arange(3, 19, dtype=torch.long)[None] % model.config.vocab_size
    full = model(input_ids=ids).logits
    split = head(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    err = float((full - split).abs().max())
    if err > 1e-3 * max(1.0, float(full.abs().max())):
        raise ValueError(f"trunk/head split is not exact for this model (max logit error {err:.2e})")


def merge_head(model, head, k: int) -> None:
    """Copy the trained head's layers and norm back into the full model, in place."""
    n = model.config.num_hidden_layers
    with torch.no_grad():
        for i in range(k):
            model.model.layers[n - k + i].load_state_dict(head.model.layers[i].state_dict())
        model.model.norm.load_state_dict(head.model.norm.state_dict())


def use_dense_log_prob_head(head) -> None:
    """Replace trl's tiled fused LM head on ``head`` with one dense pass over the labelled positions.

    trl tiles the LM head and recomputes logits in backward to save GPU memory; on a
    CPU with a 135M model that costs ~3x the step time. Here the logits of the
    completion tokens are materialized once (a few hundred MB at most) and every
    per-token field trl reads is computed from them. Call after DPOTrainer() has
    patched the model.
    """
    import types

    import torch.nn.functional as F
    from trl.trainer.utils import FusedCausalLMOutput

    patched = head.forward

    def forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return patched(*args, labels=labels, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.model(*args, **kwargs).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        logits = self.lm_head(hidden[mask]).float()
        logp_all = F.log_softmax(logits, dim=-1)
        picked = logp_all.gather(1, target[mask][:, None])[:, 0]
        log_probs = torch.zeros(target.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
        with torch.no_grad():
            zeros = lambda: torch.zeros(target.shape, dtype=picked.dtype, device=picked.device)  # noqa: E731
            entropy = zeros().masked_scatter(mask, -(logp_all.exp() * logp_all).sum(-1))
            mean_logits = zeros().masked_scatter(mask, logits.mean(-1))
            is_top1 = torch.zeros(target.shape, dtype=torch.bool, device=picked.device).masked_scatter(
                mask, logits.argmax(-1) == target[mask])
        n = mask.sum().clamp(min=1)
        return FusedCausalLMOutput(loss=-(log_probs.sum() / n), log_probs=log_probs, entropy=entropy,
                                   mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)

    head.forward = types.MethodType(forward, head)


def _sub_model(model, start: int, count: int, norm: nn.Module):
    """A decoder stack made of ``count`` of ``model``'s own layers (shared, not copied).

    Layers above the first get attention views numbered from 0, so a KV cache built for
    the sub-model's config has a slot for each of them."""
    from transformers import AutoModel

    base = model.model
    sub = AutoModel.from_config(_config_with_layers(model.config, count, start))
    sub.embed_tokens = base.embed_tokens
    sub.layers = nn.ModuleList(base.layers[start:start + count] if start == 0 else
                               [_renumbered(layer, i) for i, layer in enumerate(base.layers[start:start + count])])
    sub.rotary_emb = base.rotary_emb
    sub.norm = norm
    return sub.eval().to(base.embed_tokens.weight.dtype)


def _renumbered(layer: nn.Module, idx: int) -> nn.Module:
    """The same layer (same parameter tensors, so in-place re-weighting is seen) whose
    attention reads and writes KV-cache slot ``idx``."""
    view = copy.copy(layer)
    view._modules = dict(layer._modules)
    attn = copy.copy(layer.self_attn)
    attn.layer_idx = idx
    view._modules["self_attn"] = attn
    return view


def top_layer_scorer(model, changing: Sequence[str]) -> Optional["TopLayerScorer"]:
    """A ``TopLayerScorer`` when every changing tensor is in the top layers or the final norm, else None."""
    if getattr(model.config, "model_type", None) not in SUPPORTED_MODEL_TYPES or not changing:
        return None
    n = model.config.num_hidden_layers
    lowest = n
    for name in changing:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            lowest = min(lowest, int(m.group(1)))
        elif not name.startswith("model.norm."):
            return None  # embeddings / LM head change: every layer's input changes
    k = n - lowest
    return TopLayerScorer(model, k) if 0 < k < n else None


def token_logprobs(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log p(target) at each position; the vocabulary-sized logits exist one chunk at a time."""
    out = []
    for s in range(0, len(hidden), chunk):
        logits = lm_head(hidden[s:s + chunk]).float()
        out.append(logits.gather(1, targets[s:s + chunk, None])[:, 0] - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0)


class TopLayerScorer:
    """Token-mean response log-probs when only the top ``k`` layers and the final norm change.

    Vectors trained with the CPU preset leave the bottom layers untouched, so the input
    of layer L−k for each context and response is the same at every λ: it is computed
    once and kept, and each call runs only the top k layers and the LM head. Each
    query's context goes through the top layers once; its responses continue from that
    KV cache, grouped by length across queries so little is spent on padding. Exact,
    not an approximation: the same function as the full forward pass, on the model's
    own (shared) parameters, so re-weighting the model in place is seen here.
    """

    def __init__(self, model, k: int, rows_per_batch: int = 12):
        n = model.config.num_hidden_layers
        self.model, self.k, self.rows_per_batch = model, k, rows_per_batch
        self.trunk = _sub_model(model, 0, n - k, nn.Identity())
        self.top = _sub_model(model, n - k, k, model.model.norm)
        # (context, continuations) -> trunk output for the context and for each response's inputs
        self.states: Dict[tuple, Tuple[torch.Tensor, List[torch.Tensor]]] = {}

    @torch.no_grad()
    def _trunk_states(self, q) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        key = (tuple(q.context_ids), tuple(tuple(c) for c in q.continuations))
        if key not in self.states:
            out = self.trunk(input_ids=torch.tensor([q.context_ids]), use_cache=True)
            # a response's inputs are its tokens but the last (which nothing after it predicts)
            resp = [self.trunk(input_ids=torch.tensor([c[:-1]]), past_key_values=copy.deepcopy(out.past_key_values),
                               use_cache=True).last_hidden_state[0] if len(c) > 1 else out.last_hidden_state[0, :0]
                    for c in q.continuations]
            self.states[key] = (out.last_hidden_state[0], resp)
        return self.states[key]

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
        # the rest of each response, by length: rows of similar length share a batch
        order = sorted((r for r in range(len(rows)) if len(rows[r][2])), key=lambda r: len(rows[r][2]))
        for start in range(0, len(order), self.rows_per_batch):
            batch = order[start:start + self.rows_per_batch]
            width = max(len(rows[r][2]) for r in batch)
            emb = torch.zeros(len(batch), width, d, dtype=ctx.dtype)
            for j, r in enumerate(batch):
                emb[j, : len(rows[r][2])] = rows[r][2]
            pos, mask = continuation_layout([lc[rows[r][0]] for r in batch], [len(rows[r][2]) for r in batch], width_c)
            cache = copy.deepcopy(out.past_key_values)
            cache.reorder_cache(owner[batch])  # each row gets its own query's context KV
            hidden = self.top(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=False).last_hidden_state
            picked = torch.cat([hidden[j, : len(rows[r][2])] for j, r in enumerate(batch)])
            targets = torch.tensor([t for r in batch for t in rows[r][1][1:]])
            got = token_logprobs(self.model.lm_head, picked, targets).tolist()
            at = 0
            for r in batch:
                n = len(rows[r][2])
                logps[r].extend(got[at: at + n])
                at += n
        scores, r = [], 0
        for q in queries:
            scores.append([float(torch.tensor(logps[r + i], dtype=torch.float64)[q.n_whitespace:].mean())
                           for i in range(len(q.continuations))])
            r += len(q.continuations)
        return scores
