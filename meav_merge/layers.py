"""Cutting a decoder LM into stacks of its own layers: what frozen-trunk training and top-layer scoring share.

Both exploit the same fact: when only the top k layers change, the input of layer L−k
is fixed, so the bottom stack runs once. The stacks built here share the model's
parameter tensors (never copies), so re-weighting the model in place is seen by them.
Applies to decoder stacks whose forward is ``embed → layers → norm → lm_head`` with no
embedding scaling (Llama, Mistral, Qwen2/3 layouts).
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

from torch import nn

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def config_with_layers(config, n: int, start: int):
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(config.layer_types)[start:start + n]
    return cfg


def sub_model(model, start: int, count: int, norm: nn.Module):
    """A decoder stack made of ``count`` of ``model``'s own layers (shared, not copied).

    Layers above the first get attention views numbered from 0, so a KV cache built for
    the sub-model's config has a slot for each of them."""
    from transformers import AutoModel

    base = model.model
    sub = AutoModel.from_config(config_with_layers(model.config, count, start))
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


def sliding_window(config) -> Optional[int]:
    """The window some layer attends within (Mistral's default, Qwen2's option), or None. Its KV cache
    keeps only the window: right-padded contexts lose real tokens from it, and packed scoring
    (``evaluation.packed``) cannot read it."""
    if getattr(config, "use_sliding_window", None) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types and "sliding_attention" not in types:
        return None
    return getattr(config, "sliding_window", None) or None


@functools.lru_cache(maxsize=1)
def cache_arg() -> str:
    """The keyword a decoder's forward takes its KV cache by: transformers 5.x renamed
    ``past_key_values`` to ``cache`` and warns (FutureWarning) on the old name."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def kv_cache(out):
    """The KV cache a forward pass returned, under either name (reading ``out.past_key_values``
    on transformers 5.x warns as well)."""
    return out.get(cache_arg())
