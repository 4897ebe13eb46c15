"""Composed training (``meav train-composed``) on a tiny random model: vectors whose λ compose."""

import itertools
import json

import pytest

from meav_merge.data.schema import parse_record, write_jsonl
from meav_merge.training.composed import ComposedTrainConfig, train_composed

TOPICS = {"medical": "my blood pressure pills", "legal": "my landlord's eviction notice"}


def _records(domain, n=8):
    out = []
    for i in range(n):
        out.append(parse_record({
            "id": f"{domain[:3]}-{i}", "domain": domain, "persona": "someone",
            "query": f"What should I do about {TOPICS[domain]}, case {i}?",
            "expert": f"Check item {i + 3} of the {domain} rules and file form {i + 10} within a week.",
            "generic": "Generally, it is a good idea to talk to a professional about this.",
            "avoidance": "I'm sorry, I can't help with that.",
            "split": "train"}, f"t:{i}"))
    return out


@pytest.fixture()
def composed_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for domain in TOPICS:
        write_jsonl(_records(domain), d / f"{domain}.jsonl")
    return d


def test_vectors_compose_to_every_target(tiny_dirs, composed_data, tmp_path):
    """Each of the 9 combinations (λ in {-1, 0, +1} per domain) puts each domain's own
    target level on top for most of its queries, scored by the real scoring path on the
    merged weights; before training the base meets far fewer."""
    from meav_merge.evaluation.search import ExactEvaluator
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.vectors.alignment_vector import AlignmentVector

    cfg = ComposedTrainConfig(steps=150, trainable_layers=1, learning_rate=3e-3, max_length=96, logging_steps=50)
    out = train_composed(tiny_dirs["base"], composed_data, tmp_path / "run", list(TOPICS), cfg)
    vectors = [AlignmentVector.load(out / "vectors" / d) for d in TOPICS]
    assert all(v.meta["base"] == str(out / "centered") for v in vectors)
    rm = ReweightableModel(out / "centered", vectors)  # checks each vector's base fingerprint
    ev = ExactEvaluator(rm, str(composed_data), list(TOPICS), split="train")
    level = {-1: "avoidance", 0: "generic", 1: "expert"}
    met = 0
    for lam in itertools.product((-1, 0, 1), repeat=2):
        fr = ev(lam).fractions
        met += all(fr[d][level[x]] > 0.5 for d, x in zip(TOPICS, lam))
    assert met >= 8, met
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["log"][-1]["loss"] < metrics["log"][0]["loss"]


def test_composed_refuses_bad_input(tiny_dirs, composed_data, tmp_path):
    cfg = ComposedTrainConfig(steps=2, trainable_layers=1, max_length=96)
    with pytest.raises(ValueError, match="at least two"):
        train_composed(tiny_dirs["base"], composed_data, tmp_path / "run", ["medical"], cfg)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        train_composed(tiny_dirs["base"], composed_data, tmp_path / "exists", list(TOPICS), cfg)
    with pytest.raises(ValueError, match="positive|must be"):
        ComposedTrainConfig(steps=0)
