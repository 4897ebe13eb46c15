"""lm-eval glue for the MEAV preference-accuracy tasks (paper Eq. 4).

The context is the chat-formatted query; each response is a multiple-choice
continuation scored by lm-eval's HF backend. Two lm-eval quirks are handled here:

- lm-eval moves the context's trailing whitespace (the chat template's final "\n")
  into every continuation. We do that move ourselves (the doc's context is stripped
  and each choice starts with the whitespace) and add one extra choice that is the
  whitespace alone: its log-likelihood is subtracted, so only the response's own
  tokens count, as in the paper's Eq. 4.
- ``process_results`` gets only (log-likelihood sum, is_greedy) per choice, no token
  counts, so the dataset builder records how many tokens lm-eval's split gives each
  continuation, using the model's own tokenizer exactly as lm-eval splits.

The result is the same token-mean log-probability ``meav sweep`` computes.

Task options, through ``--metadata '{...}'`` (model_args arrive there too):
  data_file   JSONL in the meav_merge schema to score instead of the shipped test split
  split       which split of it to use: train | validation | test | all (default test)
  target      level counted by pref_acc_target, e.g. "avoidance", or per domain
              {"medical": "avoidance", "legal": "expert"} (default: the best level)
  tokenizer   tokenizer path when `pretrained` is not a path (e.g. an in-memory model)
  system_prompt  system message for the chat context

Any other key, a domain that is not one of the data schema's, a level that is not
the domain's, or a split that is not one of the four is an error naming the key
(meav_merge.evaluation.task_metadata); with ``lm_eval`` it comes before the model loads.
"""

from __future__ import annotations

import functools
from typing import Dict, List

import datasets

from meav_merge.data.schema import levels_for, load_records
from meav_merge.evaluation.scoring import chat_context, encode_pair, winners
from meav_merge.evaluation.task_metadata import SHORT, check_task_metadata
from meav_merge.resources import data_dir


def metric_name(level: str) -> str:
    return "pref_acc_" + SHORT.get(level, level)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _as_bool(value):
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return value


def _target(metadata: dict, domain: str, levels) -> str:
    target = metadata.get("target")
    if isinstance(target, dict):
        target = target.get(domain)  # other domains' entries were checked by check_task_metadata
    target = target or levels[0]
    aliases = {v: k for k, v in SHORT.items()}
    target = aliases.get(target, target)
    if target not in levels:
        raise ValueError(f"meav_pref: --metadata target '{target}' is not a level of {domain} ({', '.join(levels)})")
    return target


def load_dataset(domain: str = "medical", **metadata) -> datasets.DatasetDict:
    """``custom_dataset`` for the meav_pref tasks: one doc per query, with token counts."""
    check_task_metadata(metadata)  # before the tokenizer and data are read
    tok_path = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(tok_path, str):
        raise ValueError("meav_pref: the tokenizer is needed to build the chat context; pass "
                         "--model_args pretrained=<path> or --metadata '{\"tokenizer\": \"<path>\"}'")
    tok = _tokenizer(tok_path)
    add_bos = _as_bool(metadata.get("add_bos_token"))
    source = metadata.get("data_file") or data_dir()
    split = metadata.get("split", "test")
    records = load_records(source, domain, None if split == "all" else split)
    levels = list(levels_for(domain))
    target = _target(metadata, domain, levels)
    system = metadata.get("system_prompt")
    docs: List[Dict] = []
    for r in records:
        full = chat_context(tok, r.query, system)
        context = full.rstrip()
        ws = full[len(context):]
        choices = [ws + r.responses[lv] for lv in levels]
        counts = [len(encode_pair(tok, context, c, add_bos)[1]) for c in choices]
        n_ws = len(encode_pair(tok, context, ws, add_bos)[1]) if ws else 0
        docs.append({"id": r.id, "context": context, "choices": choices, "whitespace": ws,
                     "levels": levels, "n_tokens": counts, "n_whitespace": n_ws, "target": target})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def doc_to_text(doc) -> str:
    return doc["context"]


def doc_to_choice(doc) -> List[str]:
    # The last choice, the whitespace alone, is scored only to be subtracted (see module docstring).
    return list(doc["choices"]) + ([doc["whitespace"]] if doc["n_whitespace"] else [])


def doc_to_target(doc) -> int:
    return doc["levels"].index(doc["target"])


def process_results(doc, results) -> Dict[str, float]:
    lls = [ll for ll, _ in results]
    ws_ll = lls[len(doc["choices"])] if doc["n_whitespace"] else 0.0
    n_ws = doc["n_whitespace"]
    means = [(ll - ws_ll) / (n - n_ws) for ll, n in zip(lls, doc["n_tokens"])]
    (won,) = winners([means], doc["levels"])
    out = {metric_name(lv): float(lv == won) for lv in doc["levels"]}
    out["pref_acc_target"] = float(won == doc["target"])
    return out
