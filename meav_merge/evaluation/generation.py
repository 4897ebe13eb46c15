"""Greedy answers from a causal LM, and the two pieces every generator here shares.

``stop_token_ids`` (where an answer ends) and ``left_padded`` (a batch of prompts of
different lengths) serve ``generate_answers`` (judged generation accuracy), the AWOT
evaluation and the local synthesis backend alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from meav_merge.data.schema import Record
from meav_merge.evaluation.level_classifier import Answer, JudgeError

if TYPE_CHECKING:
    import torch

_MARKER = "MEAVENDMARKER"


def chat_end_token_id(tokenizer) -> Optional[int]:
    """The special token the chat template puts right after an assistant turn (ChatML:
    ``<|im_end|>``), read from the template itself rather than assumed; None without one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _MARKER}], tokenize=False)
    except Exception:  # a template that needs other roles or variables: no end token to learn
        return None
    after = text.split(_MARKER, 1)[1] if _MARKER in text else ""
    ids = tokenizer.encode(after.lstrip(), add_special_tokens=False) if after.strip() else []
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder) else None


def stop_token_ids(model, tokenizer) -> List[int]:
    """The tokens that end an answer: the tokenizer's EOS, the model's own EOS ids and the chat end token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.update((tokenizer.eos_token_id, chat_end_token_id(tokenizer)))
    return sorted(i for i in ids if i is not None)


def pad_token_id(tokenizer, stop: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop[0] if stop else 0


def left_padded(encoded: Sequence[Sequence[int]], pad: int, device=None) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Token ids and attention mask, left-padded: every prompt ends where generation starts."""
    import torch

    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e):] = torch.tensor(list(e), dtype=torch.long)
        mask[row, width - len(e):] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(new: Sequence[int], stop: Sequence[int]) -> Tuple[List[int], bool]:
    """The generated tokens before the first stop token, and whether one came."""
    for k, t in enumerate(new):
        if t in stop:
            return list(new[:k]), True
    return list(new), False


def generate_answers(model, tokenizer, records: Sequence[Record], max_new_tokens: int = 128,
                     system: Union[None, str, Sequence[Optional[str]]] = None, batch_size: int = 8,
                     progress: bool = True, repetition_penalty: float = 1.0) -> List[Answer]:
    """Greedy answers to each record's chat-formatted query, at most ``max_new_tokens`` tokens.

    ``system`` is one system prompt for all records or one per record (several prompting
    variants then share the decoding steps of one batch). ``repetition_penalty`` > 1 is
    HF's (CTRL's) penalty, still deterministic: steered 135M models fall into loops under
    plain greedy decoding, and the AWOT paper generates with 1.5.

    The prompt is ``scoring.chat_context`` (the preference metric's context) tokenized the way
    lm-eval's HF backend does, so the ``meav_gen`` task generates the same answers.
    """
    import torch
    from transformers import GenerationConfig

    from meav_merge.evaluation.scoring import chat_context, tok_encode

    if max_new_tokens < 1:
        raise JudgeError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    stop = stop_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, stop)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad,
                               repetition_penalty=repetition_penalty)
    systems = [system] * len(records) if system is None or isinstance(system, str) else list(system)
    if len(systems) != len(records):
        raise JudgeError(f"got {len(systems)} system prompts for {len(records)} records")
    prompts = [tok_encode(tokenizer, chat_context(tokenizer, r.query, s)) for r, s in zip(records, systems)]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    device = next(model.parameters()).device
    model.eval()
    answers: Dict[int, Answer] = {}
    with tqdm(total=len(records), desc="generate", unit="answer", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            ids, mask = left_padded([prompts[i] for i in batch], pad, device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            for row, i in enumerate(batch):
                kept, finished = cut_at_stop(out[row, ids.shape[1]:].tolist(), stop)
                r = records[i]
                answers[i] = Answer(id=r.id, domain=r.domain, query=r.query, n_tokens=len(kept), finished=finished,
                                    text=tokenizer.decode(kept, skip_special_tokens=True).strip())
            bar.update(len(batch))
    return [answers[i] for i in range(len(records))]
