"""The offline level judge: TF-IDF + logistic regression over the dataset's own responses.

``LevelClassifier`` puts a text at one of the proficiency levels (expert / generic /
avoidance). It is trained on every response of the train split, each labelled with its
level, and its held-out accuracy on the test split's responses travels with every
judged result (see judge.py), because a model's answers are out of its training
distribution. It is stored as JSON + npz and applied by hand, never pickled.

Also here: what every judge shares (``Answer``, accuracy on held-out responses).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from meav_merge.io.checkpoint import atomic_output_dir
from meav_merge.data.schema import DOMAIN_FILES, DOMAIN_LEVELS, PROFICIENCY_LEVELS, Record, file_sha256, read_jsonl

LEVELS = PROFICIENCY_LEVELS
UNPARSED = "unparsed"  # what an LLM judge says when its reply names no level
CLASSIFIER_FORMAT = 1
EMPTY_LEVEL = "avoidance"  # an answer without a single word gives no advice at all: avoidance by definition


def is_empty(text: str) -> bool:
    return not re.search(r"\w", text or "")


class JudgeError(ValueError):
    """A judge that cannot be built, loaded or asked as requested."""


@dataclass
class Answer:
    """One text to judge: a generated answer (or a dataset response) to a record's query."""

    id: str
    domain: str
    query: str
    text: str
    n_tokens: int = 0
    finished: bool = True  # stopped at an end token rather than at max_new_tokens


AnswerLike = Union[Answer, str]


def as_answers(answers: Sequence[AnswerLike]) -> List[Answer]:
    return [a if isinstance(a, Answer) else Answer(id=str(i), domain="", query="", text=str(a))
            for i, a in enumerate(answers)]


def response_answers(records: Sequence[Record]) -> Tuple[List[Answer], List[str]]:
    """The dataset's own responses as answers, with their level as the gold label."""
    answers, gold = [], []
    for r in records:
        for level in LEVELS:
            if level in r.responses:
                answers.append(Answer(id=f"{r.id}:{level}", domain=r.domain, query=r.query, text=r.responses[level]))
                gold.append(level)
    return answers, gold


def level_accuracy(gold: Sequence[str], predicted: Sequence[str], split: Optional[str]) -> dict:
    per_level = {}
    for level in LEVELS:
        idx = [i for i, g in enumerate(gold) if g == level]
        per_level[level] = sum(predicted[i] == level for i in idx) / len(idx) if idx else None
    n = len(gold)
    return {"overall": sum(p == g for p, g in zip(predicted, gold)) / max(1, n), "per_level": per_level,
            "n": n, "split": split, "unparsed": sum(p == UNPARSED for p in predicted) / max(1, n)}


# --- the offline judge ----------------------------------------------------------------------
@dataclass
class LevelClassifierConfig:
    """TF-IDF + logistic regression. Measured on the shipped data (5-fold grouped CV on train /
    test): pooled 0.997 / 1.000, pooled + domain token 0.997 / 1.000, one model per domain
    0.996 / 1.000. Pooled is the default: as good, and it also applies to domains it never saw."""

    ngram_range: Tuple[int, int] = field(default=(1, 2), metadata={
        "help": "classifier: shortest,longest word n-gram of the TF-IDF features", "flags": ("--classifier-ngrams",)})
    sublinear_tf: bool = field(default=True, metadata={
        "help": "classifier: 1 + log(tf) instead of raw term counts", "flags": ("--classifier-sublinear-tf",)})
    min_df: int = field(default=1, metadata={
        "help": "classifier: ignore terms in fewer training texts", "flags": ("--classifier-min-df",), "positive": True})
    C: float = field(default=10.0, metadata={
        "help": "classifier: inverse L2 strength of the logistic regression", "flags": ("--classifier-c",),
        "positive": True})
    max_iter: int = field(default=1000, metadata={
        "help": "classifier: optimizer iterations", "flags": ("--classifier-max-iter",), "positive": True})
    domain_feature: bool = field(default=False, metadata={
        "help": "classifier: prepend a per-domain token to every text", "flags": ("--classifier-domain-feature",)})


def _domain_token(domain: str) -> str:
    return f"meavdomain{re.sub(r'[^a-z0-9]', '', domain.lower())}"


class LevelClassifier:
    """Puts a text at one of the proficiency levels. A judge: ``judge(answers) -> labels``."""

    labels = LEVELS

    def __init__(self, config: Optional[LevelClassifierConfig] = None):
        self.config = config or LevelClassifierConfig()
        self.vocabulary: List[str] = []
        self.idf = self.coef = self.intercept = None
        self.classes: List[str] = []
        self.trained_on: List[str] = []  # record ids, so held-out numbers can refuse them
        self.heldout: Optional[dict] = None
        self._counter = None

    # The linear model is applied by hand from the stored arrays (tf -> sublinear -> idf -> l2 ->
    # logits), so a loaded classifier needs no pickle and predicts exactly as the fitted one.
    def _texts(self, texts: Sequence[str], domains: Optional[Sequence[str]]) -> List[str]:
        if not self.config.domain_feature:
            return list(texts)
        if domains is None or len(domains) != len(texts):
            raise JudgeError("this classifier uses the domain as a feature: pass one domain per text")
        return [f"{_domain_token(d)} {t}" for t, d in zip(texts, domains)]

    def fit(self, records: Sequence[Record]) -> "LevelClassifier":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        answers, gold = response_answers(records)
        if set(gold) != set(LEVELS):
            raise JudgeError(f"LevelClassifier.fit: need responses at every level ({', '.join(LEVELS)}); "
                             f"got {len(records)} records with levels {sorted(set(gold))}")
        c = self.config
        vec = TfidfVectorizer(ngram_range=tuple(c.ngram_range), sublinear_tf=c.sublinear_tf, min_df=c.min_df)
        x = vec.fit_transform(self._texts([a.text for a in answers], [a.domain for a in answers]))
        lr = LogisticRegression(C=c.C, max_iter=c.max_iter).fit(x, gold)
        terms = vec.get_feature_names_out()
        self.vocabulary = [str(t) for t in terms]
        self.idf = vec.idf_.astype(np.float64)
        self.coef = lr.coef_.astype(np.float64)
        self.intercept = lr.intercept_.astype(np.float64)
        self.classes = [str(k) for k in lr.classes_]
        self.trained_on = sorted({r.id for r in records})
        self.heldout, self._counter = None, None
        return self

    def _check_fitted(self) -> None:
        if self.coef is None:
            raise JudgeError("LevelClassifier is not fitted: call fit(records) or LevelClassifier.load(path)")

    def decision_function(self, texts: Sequence[str], domains: Optional[Sequence[str]] = None) -> np.ndarray:
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.preprocessing import normalize

        self._check_fitted()
        if self._counter is None:
            self._counter = CountVectorizer(ngram_range=tuple(self.config.ngram_range),
                                            vocabulary={t: i for i, t in enumerate(self.vocabulary)})
        x = self._counter.transform(self._texts(texts, domains)).astype(np.float64)
        if self.config.sublinear_tf:
            np.log(x.data, out=x.data)
            x.data += 1.0
        x = normalize(x.multiply(self.idf[None, :]).tocsr(), norm="l2")
        return np.asarray(x @ self.coef.T) + self.intercept

    def predict_proba(self, texts: Sequence[str], domains: Optional[Sequence[str]] = None) -> np.ndarray:
        z = self.decision_function(texts, domains)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, texts: Sequence[str], domains: Optional[Sequence[str]] = None) -> List[str]:
        if len(texts) == 0:
            return []
        return [self.classes[i] for i in self.decision_function(texts, domains).argmax(axis=1)]

    def judge(self, answers: Sequence[AnswerLike]) -> List[str]:
        """A level per answer; empty answers are ``EMPTY_LEVEL`` (the linear model would only guess)."""
        answers = as_answers(answers)
        labels = self.predict([a.text for a in answers], [a.domain for a in answers])
        return [EMPTY_LEVEL if is_empty(a.text) else lab for a, lab in zip(answers, labels)]

    def confidence(self, answers: Sequence[AnswerLike]) -> List[float]:
        """The probability of the chosen level, per answer (1 for empty answers). Far below the
        held-out mean (about 0.9 on the shipped data) means the answers look unlike any training
        response: trust the labels less."""
        answers = as_answers(answers)
        if not answers:
            return []
        top = self.predict_proba([a.text for a in answers], [a.domain for a in answers]).max(axis=1)
        return [1.0 if is_empty(a.text) else float(p) for a, p in zip(answers, top)]

    def heldout_accuracy(self, records: Sequence[Record], split: Optional[str] = "test") -> dict:
        """Accuracy on the responses of ``records`` (those of ``split``; None: all), overall and per level."""
        records = [r for r in records if split is None or r.split == split]
        if not records:
            raise JudgeError(f"heldout_accuracy: no '{split}' records given")
        seen = set(self.trained_on).intersection(r.id for r in records)
        if seen:
            raise JudgeError(f"heldout_accuracy: {len(seen)} records (e.g. '{sorted(seen)[0]}') were used to "
                             "train the classifier; held-out accuracy needs unseen records")
        answers, gold = response_answers(records)
        self.heldout = level_accuracy(gold, self.judge(answers), split)
        self.heldout["mean_confidence"] = float(np.mean(self.confidence(answers)))
        return self.heldout

    def describe(self) -> dict:
        return {"kind": "level_classifier", "heldout_accuracy": self.heldout,
                "trained_on_records": len(self.trained_on), "config": asdict(self.config)}

    # --- storage: JSON + npz, never pickle ------------------------------------------------------
    def save(self, path: Union[str, os.PathLike], force: bool = False) -> Path:
        self._check_fitted()
        with atomic_output_dir(path, force=force) as tmp:
            meta = {"format": "meav_level_classifier", "format_version": CLASSIFIER_FORMAT,
                    "config": asdict(self.config), "classes": self.classes, "vocabulary": self.vocabulary,
                    "trained_on": self.trained_on, "heldout": self.heldout}
            (tmp / "classifier.json").write_text(json.dumps(meta))
            np.savez(tmp / "classifier.npz", idf=self.idf, coef=self.coef, intercept=self.intercept)
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "LevelClassifier":
        path = Path(path)
        try:
            meta = json.loads((path / "classifier.json").read_text())
            if meta.get("format") != "meav_level_classifier" or meta.get("format_version") != CLASSIFIER_FORMAT:
                raise ValueError(f"unknown format {meta.get('format')!r} version {meta.get('format_version')!r}")
            with np.load(path / "classifier.npz", allow_pickle=False) as arrays:
                idf, coef, intercept = arrays["idf"], arrays["coef"], arrays["intercept"]
            cfg = dict(meta["config"], ngram_range=tuple(meta["config"]["ngram_range"]))
            clf = cls(LevelClassifierConfig(**cfg))
            clf.vocabulary, clf.classes, clf.trained_on = meta["vocabulary"], meta["classes"], meta["trained_on"]
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise JudgeError(f"{path}: not a saved LevelClassifier ({e})") from None
        clf.heldout, clf.idf, clf.coef, clf.intercept = meta.get("heldout"), idf, coef, intercept
        if coef.shape != (len(clf.classes), len(clf.vocabulary)) or idf.shape != (len(clf.vocabulary),):
            raise JudgeError(f"{path}: array shapes do not match the vocabulary and classes")
        return clf


def proficiency_records(data: Union[str, os.PathLike], split: str) -> List[Record]:
    """Records of one split from a data file, or from every three-level domain's file in a directory."""
    data = Path(data)
    files = [data] if data.is_file() else [data / DOMAIN_FILES[d] for d, lv in DOMAIN_LEVELS.items()
                                          if lv == LEVELS and (data / DOMAIN_FILES[d]).is_file()]
    records = [r for f in files for r in read_jsonl(f) if r.levels == LEVELS and r.split == split]
    if not records:
        raise JudgeError(f"{data}: no '{split}' records with levels {', '.join(LEVELS)}")
    return records


def cache_dir() -> Path:
    """$MEAV_MERGE_CACHE, else $XDG_CACHE_HOME/meav_merge, else ~/.cache/meav_merge."""
    if os.environ.get("MEAV_MERGE_CACHE"):
        return Path(os.environ["MEAV_MERGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meav_merge"


def default_classifier(data: Optional[Union[str, os.PathLike]] = None, config: Optional[LevelClassifierConfig] = None,
                       use_cache: bool = True) -> LevelClassifier:
    """A classifier trained on the train split of ``data`` (default: the shipped data), its
    held-out accuracy measured on the test split, cached on disk under ``cache_dir()`` keyed
    by the data files' and the config's hash (a few seconds to train; milliseconds to load)."""
    from meav_merge.resources import data_dir

    data = Path(data) if data is not None else data_dir()
    config = config or LevelClassifierConfig()
    train, test = proficiency_records(data, "train"), proficiency_records(data, "test")
    files = sorted({r.source.rsplit(":", 1)[0] for r in train + test})
    key = hashlib.sha256(f"{file_sha256(files)}|{json.dumps(asdict(config), sort_keys=True)}|"
                         f"{CLASSIFIER_FORMAT}".encode()).hexdigest()[:16]
    path = cache_dir() / f"level_classifier-{key}"
    if use_cache and path.is_dir():
        try:
            return LevelClassifier.load(path)
        except JudgeError:
            pass  # a damaged cache entry is rebuilt below
    clf = LevelClassifier(config).fit(train)
    clf.heldout_accuracy(test)
    if use_cache:
        try:
            clf.save(path, force=True)
        except OSError:  # a read-only home or a concurrent writer: the cache only saves time
            pass
    return clf
