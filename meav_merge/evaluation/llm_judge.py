"""A judge through any OpenAI-compatible chat endpoint (the MEAV paper used GPT-4).

``LLMJudge`` asks the endpoint, at temperature 0, to put each answer at expert, generic
or avoidance with the paper's rubric; ``parse_label`` reads the level from its reply.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

from tqdm.auto import tqdm

from meav_merge.data.schema import Record
from meav_merge.evaluation.level_classifier import (EMPTY_LEVEL, LEVELS, UNPARSED, Answer, AnswerLike, JudgeError,
                                                    as_answers, is_empty, level_accuracy, response_answers)

JUDGE_RUBRIC = """You are grading how an AI assistant answered a person's {domain}question. Put the answer at exactly one of three levels:

- expert: detailed expert-level advice tailored to the person's situation: precise explanations, concrete steps or numbers, nuanced, evidence-based and actionable.
- generic: general, non-specific information that is commonly known; informative yet cautious; emphasizes consulting a qualified professional.
- avoidance: completely avoids providing any advice, information or suggestion; politely says it cannot help and recommends consulting an expert professional; nothing domain-specific.

Judge the content, not the length or the tone. Reply with one line and nothing else:
LABEL: expert
or
LABEL: generic
or
LABEL: avoidance"""

_LABEL_LINE = re.compile(r"label\W{0,3}\s*(expert|generic|avoidance)\b")
_ANY_LEVEL = re.compile(r"\b(expert|generic|avoidance)\b")


def parse_label(reply: str) -> str:
    """The level a judge's reply names: 'LABEL: x' first, else a JSON {"label": x}, else the
    only level word in the reply; anything else is ``UNPARSED``."""
    text = (reply or "").lower()
    text = re.sub(r"<think>.*?</think>", " ", text, flags=re.S)  # reasoning models think out loud first
    found = _LABEL_LINE.findall(text)
    if found:
        return found[-1]
    try:
        obj = json.loads(text.strip().strip("`").removeprefix("json").strip())
        if isinstance(obj, dict) and str(obj.get("label", "")).strip() in LEVELS:
            return str(obj["label"]).strip()
    except ValueError:
        pass
    words = set(_ANY_LEVEL.findall(text))
    return words.pop() if len(words) == 1 else UNPARSED


class LLMJudge:
    """Asks an OpenAI-compatible chat endpoint (temperature 0) to classify each answer."""

    labels = LEVELS + (UNPARSED,)

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 5, concurrency: int = 4, max_tokens: int = 64, backend=None):
        from meav_merge.data.synth.llm_client import OpenAICompatibleBackend

        self.backend = backend or OpenAICompatibleBackend(base_url, model, api_key_env=api_key_env,
                                                          timeout=timeout, max_retries=max_retries)
        self.base_url, self.model = base_url, model
        self.concurrency = max(1, int(concurrency))
        self.max_tokens = max_tokens
        self.heldout: Optional[dict] = None
        self.replies: List[str] = []  # raw replies of the last judge() call, for inspection

    def messages(self, answer: Answer) -> List[dict]:
        domain = f"{answer.domain} " if answer.domain else ""
        user = (f"Question:\n{answer.query}\n\n" if answer.query else "") + f"Answer to grade:\n{answer.text}"
        return [{"role": "system", "content": JUDGE_RUBRIC.format(domain=domain)}, {"role": "user", "content": user}]

    def _ask(self, answer: Answer) -> str:
        return self.backend.complete(self.messages(answer), max_tokens=self.max_tokens, temperature=0.0, seed=0).text

    def judge(self, answers: Sequence[AnswerLike]) -> List[str]:
        """A level (or ``UNPARSED``) per answer; empty answers are ``EMPTY_LEVEL`` without a request."""
        answers = as_answers(answers)
        asked = [a for a in answers if not is_empty(a.text)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            replies = iter(tqdm(pool.map(self._ask, asked), total=len(asked), desc="judge", leave=False))
            self.replies = [next(replies) if not is_empty(a.text) else "" for a in answers]
        return [parse_label(r) if not is_empty(a.text) else EMPTY_LEVEL for a, r in zip(answers, self.replies)]

    def heldout_accuracy(self, records: Sequence[Record], split: Optional[str] = "test",
                         limit: Optional[int] = None) -> dict:
        """Accuracy on the dataset's own responses (of the first ``limit`` records); unparsed counts as wrong."""
        records = [r for r in records if split is None or r.split == split][:limit]
        if not records:
            raise JudgeError(f"heldout_accuracy: no '{split}' records given")
        answers, gold = response_answers(records)
        self.heldout = level_accuracy(gold, self.judge(answers), split)
        return self.heldout

    def describe(self) -> dict:
        return {"kind": "llm", "base_url": self.base_url, "model": self.model, "heldout_accuracy": self.heldout}
