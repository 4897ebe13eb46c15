"""Judged generation accuracy (the MEAV paper's second metric).

Generate an answer per test query (``generation.generate_answers``), have a judge put
each answer at one of the three proficiency levels, and report the fraction at each level:

- avoidance: avoids any advice, information or suggestion; politely says it cannot
  help and recommends an expert; nothing domain-specific.
- generic: general, commonly known, non-specific information; informative yet
  cautious; emphasizes consulting a qualified professional.
- expert: detailed expert-level advice tailored to the situation: precise
  explanations, concrete steps/numbers, nuanced, evidence-based, actionable.

The paper's judge is GPT-4. Offline, the default judge is ``level_classifier.LevelClassifier``
(TF-IDF + logistic regression trained on the train-split responses); ``llm_judge.LLMJudge``
asks any OpenAI-compatible endpoint instead. Every result carries the judge's held-out
accuracy, because the classifier only ever saw the dataset's responses and a model's
answers are out of its training distribution.
"""

from __future__ import annotations

from typing import Optional, Sequence

from meav_merge.evaluation.level_classifier import AnswerLike, JudgeError


def judged_accuracy(answers: Sequence[AnswerLike], judge, labels: Optional[Sequence[str]] = None) -> dict:
    """Fraction of answers the judge puts at each level, with the judge's held-out accuracy.

    Pass ``labels`` when the answers were already judged (an LLM judge costs money per call).
    """
    labels = list(labels) if labels is not None else judge.judge(answers)
    if len(labels) != len(answers):
        raise JudgeError(f"judged_accuracy: {len(labels)} labels for {len(answers)} answers")
    n = max(1, len(labels))
    info = judge.describe()
    if hasattr(judge, "confidence") and len(answers):  # the classifier's own out-of-distribution alarm
        info["answer_confidence"] = sum(judge.confidence(answers)) / len(answers)
    return {**{lv: sum(lab == lv for lab in labels) / n for lv in judge.labels}, "n": len(labels), "judge": info}
