"""Anchor words for AWOT (Yang et al., EMNLP 2025): the token sets P and N of Eq. 3.

Three sources:

- a named manual set (``sentiment``: the paper's Table 1; ``sentiment-a1``: Appendix A.1),
- a JSON file ``{"positive": [...], "negative": [...]}`` of words,
- automatic selection (paper Eq. 6): the top-K tokens by log π*/π_ref over the chosen
  responses (P) and by −log π*/π_ref over the rejected responses (N), from an aligned
  model π* and a base model π_ref that share a vocabulary.

Steering reads one row of the LM head per anchor, so a word must be a single token.
Each word is tried with a leading space (how BPE vocabularies store a word inside a
sentence) and bare (sentence start); every form that is one token becomes an anchor.
Words with no single-token form are listed in ``Anchors.skipped``, never dropped silently.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from meav_merge.data.schema import Record

# Table 1: the anchor words AWOT uses for controlled sentiment generation.
SENTIMENT_POSITIVE = ("good", "best", "great", "nice", "interesting", "awesome", "like", "enjoy", "favorite")
SENTIMENT_NEGATIVE = ("bad", "worst", "terrible", "silly", "awful", "poor", "stupid", "ugly", "hate")
# Appendix A.1: the smaller set of the logit-gap analysis (Sec. 2.2).
ANALYSIS_POSITIVE = ("good", "best", "great", "nice", "interesting", "awesome")
ANALYSIS_NEGATIVE = ("bad", "worst", "terrible", "silly", "awful", "poor", "stupid")
ANCHOR_SETS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "sentiment": (SENTIMENT_POSITIVE, SENTIMENT_NEGATIVE),
    "sentiment-a1": (ANALYSIS_POSITIVE, ANALYSIS_NEGATIVE),
}
AUTO_PREFIX = "auto:"


class AnchorError(ValueError):
    """Unusable anchor words; the message names the file or set."""


@dataclass
class Anchors:
    """Token ids of the positive (P) and negative (N) anchors, with their strings."""

    positive_ids: List[int]
    negative_ids: List[int]
    positive_tokens: List[str] = field(default_factory=list)
    negative_tokens: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # "word: why", one per unusable word
    source: str = ""
    scores: Dict[int, float] = field(default_factory=dict)  # automatic anchors: mean log-ratio per token

    def __post_init__(self):
        if not self.positive_ids or not self.negative_ids:
            side = "positive" if not self.positive_ids else "negative"
            why = f" (skipped: {'; '.join(self.skipped)})" if self.skipped else ""
            raise AnchorError(f"{self.source or 'anchors'}: no usable {side} anchor token{why}")

    def describe(self) -> str:
        lines = [f"anchors from {self.source}: {len(self.positive_ids)} positive, {len(self.negative_ids)} negative",
                 "  P: " + " ".join(repr(t) for t in self.positive_tokens),
                 "  N: " + " ".join(repr(t) for t in self.negative_tokens)]
        if self.skipped:
            lines.append("  not single tokens (not used): " + "; ".join(self.skipped))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"source": self.source, "positive_ids": self.positive_ids, "negative_ids": self.negative_ids,
                "positive_tokens": self.positive_tokens, "negative_tokens": self.negative_tokens,
                "skipped": self.skipped}


def single_token_forms(tokenizer, word: str) -> List[Tuple[int, str]]:
    """(id, form) for each of " word" and "word" that encodes to exactly one token."""
    found, seen = [], set()
    for form in (" " + word, word):
        ids = tokenizer.encode(form, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in seen:
            seen.add(ids[0])
            found.append((ids[0], form))
    return found


def anchors_from_words(tokenizer, positive: Sequence[str], negative: Sequence[str], source: str) -> Anchors:
    """Resolve word lists to single-token anchors; words without one go to ``skipped``."""
    sides: Dict[str, Tuple[List[int], List[str]]] = {"positive": ([], []), "negative": ([], [])}
    skipped = []
    for side, words in (("positive", positive), ("negative", negative)):
        ids, tokens = sides[side]
        for word in words:
            forms = single_token_forms(tokenizer, word)
            if not forms:
                pieces = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer.encode(" " + word, add_special_tokens=False)]
                skipped.append(f"{word!r} ({side}): {len(pieces)} tokens {pieces}")
            for tid, form in forms:
                if tid not in ids:
                    ids.append(tid)
                    tokens.append(form)
    clash = set(sides["positive"][0]) & set(sides["negative"][0])
    if clash:
        raise AnchorError(f"{source}: tokens {sorted(tokenizer.convert_ids_to_tokens(list(clash)))} are both "
                          "positive and negative")
    return Anchors(sides["positive"][0], sides["negative"][0], sides["positive"][1], sides["negative"][1],
                   skipped, source)


def read_anchor_file(path: Union[str, os.PathLike]) -> Tuple[List[str], List[str]]:
    """The word lists of a ``{"positive": [...], "negative": [...]}`` JSON file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise AnchorError(f"{path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnchorError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AnchorError(f"{path}: expected an object with keys 'positive' and 'negative'")
    unknown = sorted(set(obj) - {"positive", "negative"})
    if unknown:
        raise AnchorError(f"{path}: unknown key '{unknown[0]}' (expected 'positive' and 'negative')")
    lists = []
    for key in ("positive", "negative"):
        value = obj.get(key)
        if not isinstance(value, list) or not value:
            raise AnchorError(f"{path}: key '{key}' must be a non-empty list of words")
        for i, w in enumerate(value):
            if not isinstance(w, str) or not w.strip():
                raise AnchorError(f"{path}: '{key}'[{i}] must be a non-empty string")
        lists.append([w.strip() for w in value])
    return lists[0], lists[1]


def manual_anchors(spec: str, tokenizer) -> Anchors:
    """A named set (``sentiment``, ``sentiment-a1``) or a JSON word-list file."""
    if spec in ANCHOR_SETS:
        pos, neg = ANCHOR_SETS[spec]
        return anchors_from_words(tokenizer, pos, neg, source=f"set '{spec}'")
    path = Path(spec)
    if not path.is_file():
        raise AnchorError(f"{spec}: not a named anchor set ({', '.join(ANCHOR_SETS)}) nor an existing JSON file")
    pos, neg = read_anchor_file(path)
    return anchors_from_words(tokenizer, pos, neg, source=str(path))


# --- automatic anchors (paper Eq. 6 / Appendix D) ----------------------------------------------------

Example = Union[Record, Tuple[str, str, str]]


def _as_pair_records(examples: Sequence[Example]) -> List[Record]:
    """(prompt, chosen, rejected) records; a Record's best level is chosen, its worst rejected."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, Record):
            q, c, r, src = ex.query, ex.responses[ex.levels[0]], ex.responses[ex.levels[-1]], ex.source or ex.id
        else:
            q, c, r = ex
            src = f"example {i}"
        out.append(Record(id=f"ex{i}", domain="pairs", query=q, responses={"chosen": c, "rejected": r}, source=src))
    return out


@torch.no_grad()
def _response_logprobs(model, context_ids: List[int], continuation: List[int]) -> torch.Tensor:
    """log π(y_t | x, y_<t) of each continuation token."""
    device = next(model.parameters()).device
    ids = torch.tensor([context_ids + continuation], device=device)
    logits = model(input_ids=ids).logits[0, len(context_ids) - 1: -1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(context_ids):, None])[:, 0]


def token_log_ratios(aligned, base, tokenizer, examples: Sequence[Example], system: Optional[str] = None,
                     progress: bool = True) -> Dict[str, Dict[int, List[float]]]:
    """Per token id, every log π*(y_t|·) − log π_ref(y_t|·) in the chosen and in the rejected responses.

    Responses are scored as replies to the chat-formatted prompt, tokenized exactly as
    ``meav_merge.evaluation.scoring`` does (so anchors and preference accuracy see the same tokens).
    """
    from meav_merge.evaluation.scoring import prepare

    n_aligned = aligned.get_output_embeddings().weight.shape[0]
    n_base = base.get_output_embeddings().weight.shape[0]
    if n_aligned != n_base:
        raise AnchorError(f"aligned and base models have different vocabularies ({n_aligned} vs {n_base} rows)")
    records = _as_pair_records(examples)
    prepared = prepare(tokenizer, records, system=system, levels=("chosen", "rejected"))
    special = set(tokenizer.all_special_ids)
    ratios: Dict[str, Dict[int, List[float]]] = {"chosen": defaultdict(list), "rejected": defaultdict(list)}
    aligned.eval()
    base.eval()
    for q in tqdm(prepared, desc="anchor log-ratios", disable=not progress, leave=False):
        for level, cont in zip(q.levels, q.continuations):
            diff = _response_logprobs(aligned, q.context_ids, cont) - _response_logprobs(base, q.context_ids, cont)
            for tid, value in list(zip(cont, diff.tolist()))[q.n_whitespace:]:
                if tid not in special:
                    ratios[level][tid].append(value)
    return ratios


def automatic_anchors(aligned, base, tokenizer, examples: Sequence[Example], top_k: int = 10, min_count: int = 1,
                      system: Optional[str] = None, progress: bool = True, source: str = "automatic") -> Anchors:
    """Eq. 6: P = top-K chosen-response tokens by mean log π*/π_ref; N = top-K rejected ones by its negative.

    A token occurring several times is ranked by its mean log-ratio over its occurrences
    (the paper leaves the aggregation open); ``min_count`` ignores rarer tokens. A token
    that would enter both sets is left out of both and reported in ``skipped``.
    """
    if top_k < 1:
        raise AnchorError(f"{source}: top_k must be at least 1, not {top_k}")
    ratios = token_log_ratios(aligned, base, tokenizer, examples, system=system, progress=progress)
    means = {level: {t: sum(v) / len(v) for t, v in per.items() if len(v) >= min_count}
             for level, per in ratios.items()}
    ranked_pos = sorted(means["chosen"], key=lambda t: (-means["chosen"][t], t))
    ranked_neg = sorted(means["rejected"], key=lambda t: (means["rejected"][t], t))
    both = set(ranked_pos[:top_k]) & set(ranked_neg[:top_k])
    skipped = [f"{tokenizer.convert_ids_to_tokens(t)!r}: top-{top_k} in both chosen and rejected" for t in sorted(both)]
    pos = [t for t in ranked_pos if t not in both][:top_k]
    neg = [t for t in ranked_neg if t not in both][:top_k]
    scores = {t: means["chosen"][t] for t in pos}
    scores.update({t: means["rejected"][t] for t in neg})
    return Anchors(pos, neg, [tokenizer.decode([t]) for t in pos], [tokenizer.decode([t]) for t in neg],
                   skipped, source, scores)


def load_causal_lm(path: Union[str, os.PathLike]):
    """A float32 causal LM and its tokenizer from a local safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meav_merge.io.checkpoint import Checkpoint

    Checkpoint(path)  # clear message for a missing or pickle-only checkpoint
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def resolve_anchors(spec: str, model, tokenizer, auto_data: Optional[Union[str, os.PathLike]] = None,
                    top_k: int = 10, split: str = "train", progress: bool = True) -> Anchors:
    """``sentiment`` | ``sentiment-a1`` | FILE.json | ``auto:ALIGNED_DIR`` (``model`` is then π_ref).

    Automatic anchors are chosen on the ``split`` records of ``auto_data`` (train by
    default, so an evaluation on the test split does not see them).
    """
    if not spec.startswith(AUTO_PREFIX):
        return manual_anchors(spec, tokenizer)
    from meav_merge.data.schema import load_records

    aligned_dir = spec[len(AUTO_PREFIX):]
    if not aligned_dir:
        raise AnchorError(f"{spec}: give the aligned model directory after '{AUTO_PREFIX}'")
    if auto_data is None:
        raise AnchorError(f"{spec}: automatic anchors need preference data (--auto-data FILE)")
    records = load_records(auto_data, split=split)
    aligned, _ = load_causal_lm(aligned_dir)
    return automatic_anchors(aligned, model, tokenizer, records, top_k=top_k, progress=progress,
                             source=f"auto: {aligned_dir} vs base on {auto_data} ({split}, {len(records)} pairs)")
