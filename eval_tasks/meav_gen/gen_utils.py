"""lm-eval hooks for ``meav_gen``: judged generation accuracy on the shipped test split.

The task builds its own docs (no hub download): the domain's test records from
``meav_merge.data.schema``, each with its query already chat-formatted by the model's own
tokenizer (taken from ``tokenizer`` or ``pretrained`` in the task metadata, where
lm-eval merges ``--model_args``), exactly as ``meav judge`` and the preference metric
format it. Do not pass ``--apply_chat_template``: the prompt is already a chat.

Each answer is judged by the offline ``LevelClassifier`` (trained on the shipped
train split at first use, cached under ~/.cache/meav_merge/); ``judge_heldout_acc``
is that classifier's accuracy on the domain's held-out test responses.
"""

from __future__ import annotations

from functools import lru_cache

import datasets

DATA_FILE_KEY = "data_file"  # --metadata '{"data_file": "my_test.jsonl"}' replaces the shipped file


def load_docs(domain: str, pretrained=None, tokenizer=None, system: str | None = None, **metadata):
    """``custom_dataset``: called with the task metadata and ``dataset_kwargs`` (the domain)."""
    from transformers import AutoTokenizer

    from meav_merge.data.schema import load_records
    from meav_merge.resources import data_dir
    from meav_merge.evaluation.scoring import chat_context

    source = tokenizer or pretrained
    if not isinstance(source, str) or not source:
        raise ValueError(f"meav_gen_{domain}: no tokenizer to chat-format the queries with; pass "
                         "--model_args pretrained=DIR or --metadata '{\"tokenizer\": \"DIR\"}'")
    tok = AutoTokenizer.from_pretrained(source)
    records = load_records(metadata.get(DATA_FILE_KEY) or data_dir(), domain, "test")
    rows = [{"id": r.id, "domain": r.domain, "query": r.query, "prompt": chat_context(tok, r.query, system),
             "expert": r.responses.get("expert", "")} for r in records]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


@lru_cache(maxsize=1)
def _classifier():
    from meav_merge.evaluation.level_classifier import default_classifier

    return default_classifier()


@lru_cache(maxsize=None)
def _heldout(domain: str) -> float:
    """The classifier's accuracy on this domain's shipped test responses (all domains' if unknown)."""
    from meav_merge.evaluation.level_classifier import level_accuracy, proficiency_records, response_answers
    from meav_merge.resources import data_dir

    clf = _classifier()
    records = [r for r in proficiency_records(data_dir(), "test") if r.domain == domain]
    if not records:
        return float(clf.heldout["overall"])
    answers, gold = response_answers(records)
    return float(level_accuracy(gold, clf.judge(answers), "test")["overall"])


def process_results(doc: dict, results: list) -> dict:
    from meav_merge.evaluation.level_classifier import Answer

    clf = _classifier()
    answer = Answer(id=doc["id"], domain=doc["domain"], query=doc["query"], text=results[0].strip())
    label = clf.judge([answer])[0]
    return {"gen_acc_exp": float(label == "expert"), "gen_acc_gen": float(label == "generic"),
            "gen_acc_avd": float(label == "avoidance"), "judge_heldout_acc": _heldout(doc["domain"]),
            # far below the held-out responses' ~0.9: the answers look unlike the training data
            "judge_confidence": clf.confidence([answer])[0]}
