"""Is a generated answer readable? Two cheap checks that catch the two ways steering breaks text.

- ``distinct_2`` (unique word bigrams / bigrams) catches loops ("in in in ...").
- ``reference_logprob`` (token-mean log-prob of the answer under an unsteered model, given
  the same prompt) catches word salad, which can have every bigram distinct
  ("Simpleasa unicsa necessitata ..."): a fluent answer is likely under the model it was
  steered from, salad is not. The unsteered model's own greedy answers give the scale.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from meav_merge.evaluation.level_classifier import Answer


def distinct_2(text: str) -> float:
    """Unique word bigrams / bigrams: low values flag repetitive, degenerate text."""
    w = text.split()
    grams = list(zip(w, w[1:]))
    return len(set(grams)) / len(grams) if grams else 1.0


def reference_logprobs(model, tokenizer, answers: Sequence[Answer], system: Optional[str] = None) -> List[float]:
    """Token-mean log-prob of each answer's text under ``model``, after its query's chat prompt."""
    from meav_merge.evaluation.scoring import PreparedQuery, chat_context, encode_pair, mean_logprobs

    prepared = []
    for a in answers:
        ctx_text = chat_context(tokenizer, a.query, system)
        ctx, ws = encode_pair(tokenizer, ctx_text, "")
        _, cont = encode_pair(tokenizer, ctx_text, a.text or " ")
        prepared.append(PreparedQuery(a.id, ("answer",), ctx, [cont], len(ws)))
    return [row[0] for row in mean_logprobs(model, tokenizer, prepared, progress=False)]


def fluency_summary(answers: Sequence[Answer], logprobs: Optional[Sequence[float]] = None) -> Dict[str, float]:
    out = {"n": len(answers), "distinct_2": sum(distinct_2(a.text) for a in answers) / max(1, len(answers))}
    if logprobs is not None:
        out["reference_logprob"] = sum(logprobs) / max(1, len(logprobs))
    return out
