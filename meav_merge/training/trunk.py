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
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from meav_merge.layers import SUPPORTED_MODEL_TYPES, cache_arg, config_with_layers, kv_cache, sub_model



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
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The trunk's output for one unpadded row of token ids, from the cache when known."""
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
                self._prefix_state[pkey] = (out.last_hidden_state[0], kv_cache(out))
            h_prefix, kv = self._prefix_state[pkey]
            rest = self._trunk(input_ids=ids[None, n:], **{cache_arg(): copy.deepcopy(kv)}, use_cache=True)
            cached = torch.cat([h_prefix, rest.last_hidden_state[0]])
        else:
            cached = self._trunk(input_ids=ids[None]).last_hidden_state[0]
        self.cache[key] = cached
        return cached

    @torch.no_grad()
    def warm(self, groups, batch_size: int = 8) -> None:
        """Fill the cache for many rows sharing prompts: each prompt's trunk runs once and
        its completions run as one batch continuing from the repeated KV cache. The prefix
        every prompt shares (a chat template's system turn, ~6% of a query's tokens here)
        runs once for all of them."""
        from tqdm.auto import tqdm

        groups = [(tuple(p), rows) for p, rows in groups]
        common = _common_prefix([p for p, _ in groups])
        shared = self._trunk(input_ids=torch.tensor([common]), use_cache=True) if common else None
        for prompt, rows in tqdm(groups, desc="trunk", unit="prompt", leave=False):
            rows = [r for r in dict.fromkeys(tuple(r) for r in rows) if r[: len(prompt)] == prompt
                    and len(r) > len(prompt) and bytes(torch.tensor(r).numpy().tobytes()) not in self.cache]
            if not rows:
                continue
            if shared is None:
                out = self._trunk(input_ids=torch.tensor([prompt]), use_cache=True)
                h_prompt = out.last_hidden_state[0]
            else:
                out = self._trunk(input_ids=torch.tensor([prompt[len(common):]]), use_cache=True,
                                  **{cache_arg(): copy.deepcopy(kv_cache(shared))})
                h_prompt = torch.cat([shared.last_hidden_state[0], out.last_hidden_state[0]])
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
                kv = copy.deepcopy(kv_cache(out))
                kv.batch_repeat_interleave(len(chunk))
                h = self._trunk(input_ids=ids, attention_mask=mask, **{cache_arg(): kv}, use_cache=True).last_hidden_state
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
            out[i, :n] = self.hidden(input_ids[i, :n])
        return out


def _common_prefix(prompts) -> tuple:
    """The longest prefix all prompts share, shorter than each (every prompt keeps a token of its own)."""
    if len(prompts) < 2:
        return ()
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return tuple(first[:n])


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
    trunk = sub_model(model, 0, n - k, nn.Identity()).requires_grad_(False)

    head = AutoModelForCausalLM.from_config(config_with_layers(config, k, n - k))
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
