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
    with pytest.raises(ValueError, match="fluency_rows: one of all, target"):
        ComposedTrainConfig(fluency_rows="targets")


def test_level_logprobs_equal_a_plain_forward_of_each_row(tiny_tokenizer):
    """The shared-context pass (context once, responses from its repeated KV cache, trunk
    states from the cache) gives the same values and gradients as the full model run on
    each context + response row alone."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from meav_merge.training.composed import _full_name, _queries, level_logprobs
    from meav_merge.training.trunk import split_model
    from tests.tiny import build_model

    model = build_model(tiny_tokenizer, layers=3)
    queries = _queries(tiny_tokenizer, _records("medical", 3) + _records("legal", 2), max_length=96)
    _, head = split_model(model, 2)
    head.model.embed_tokens.warm([(q.context, q.rows) for q in queries[:2]])  # the rest fill the cache lazily
    torch.manual_seed(1)
    base = {n: p.detach() for n, p in head.model.named_parameters() if n.startswith("layers.") or n == "norm.weight"}
    delta = {n: (0.05 * torch.randn_like(w)).requires_grad_() for n, w in base.items()}
    got = level_logprobs(head, {n: base[n] + delta[n] for n in base}, queries)
    got.sum().backward()
    got_grad = {n: d.grad.clone() for n, d in delta.items()}

    for d in delta.values():
        d.grad = None
    full = {_full_name(n, 3, 2): base[n] + delta[n] for n in base}
    want = []
    for q in queries:
        for r, s in zip(q.rows, q.starts):
            logits = functional_call(model, full, (torch.tensor([r]),)).logits[0, s - 1: len(r) - 1]
            want.append(F.log_softmax(logits, -1).gather(1, torch.tensor(r[s:])[:, None]).mean())
    want = torch.stack(want).view(len(queries), 3)
    want.sum().backward()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    for n, d in delta.items():
        assert torch.allclose(got_grad[n], d.grad, atol=1e-5, rtol=1e-4), n


def test_fluency_kl_is_the_kl_of_the_coarsened_distributions(tiny_tokenizer):
    """At the base weights the fluency term is zero; under changed weights it equals KL(base ‖ model)
    over each kept position's base top-k tokens plus one bin for the rest, written out by hand from
    full forwards of the whole model."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from meav_merge.training.composed import (FLUENCY_STRIDE, _full_name, _queries, attach_reference,
                                              fluency_kl, response_logprobs)
    from meav_merge.training.trunk import split_model
    from tests.tiny import build_model

    model = build_model(tiny_tokenizer, layers=3)
    queries = _queries(tiny_tokenizer, _records("medical", 2) + _records("legal", 1), max_length=96)
    _, head = split_model(model, 2)
    attach_reference(head, {}, queries, top_k=4, batch=2)
    assert abs(float(fluency_kl(response_logprobs(head, {}, queries), queries))) < 1e-6
    torch.manual_seed(3)
    base = {n: p.detach() for n, p in head.model.named_parameters() if n.startswith("layers.")}
    moved = {n: w + 0.2 * torch.randn_like(w) for n, w in base.items()}
    got = fluency_kl(response_logprobs(head, moved, queries), queries)

    def positions(weights, only=None):
        """Every FLUENCY_STRIDE-th position of each query's rows laid end to end; with ``only``, the
        kept positions that lie in row ``only[i]`` of query i."""
        out = []
        for i, q in enumerate(queries):
            rows = [functional_call(model, weights, (torch.tensor([r]),)).logits[0, s - 1: len(r) - 1]
                    for r, s in zip(q.rows, q.starts)]
            row_of = torch.cat([torch.full((len(x),), j) for j, x in enumerate(rows)])[::FLUENCY_STRIDE]
            kept = F.log_softmax(torch.cat(rows), -1)[::FLUENCY_STRIDE]
            out.append(kept if only is None else kept[row_of == only[i]])
        return torch.cat(out)

    def kl(ref, new):
        ids = ref.topk(4, -1).indices
        p, q = ref.gather(1, ids).exp(), new.gather(1, ids).exp()
        p_rest, q_rest = 1 - p.sum(-1), 1 - q.sum(-1)
        return ((p * (p.log() - q.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).mean()

    moved_full = {_full_name(n, 3, 2): w for n, w in moved.items()}
    with torch.no_grad():
        want = kl(positions({}), positions(moved_full))
    assert float(got) > 1e-3
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-6), (float(got), float(want))
    # fluency_rows="target": the same KL over the target row's positions alone
    only = [0, 2, 1]
    got_rows = fluency_kl(response_logprobs(head, moved, queries), queries, only)
    with torch.no_grad():
        want_rows = kl(positions({}, only), positions(moved_full, only))
    # a random tiny model drifts alike on every row, so the all-rows value is near (0.6% here): the
    # target-row value must be far nearer the hand-written subset than that
    err, gap = abs(float(got_rows - want_rows)), abs(float(got - want_rows))
    assert err < 0.05 * gap, (float(got_rows), float(want_rows), float(got))


def test_fluency_weight_keeps_the_steered_model_near_the_base(tiny_dirs, composed_data, tmp_path):
    """The same training with and without the fluency term: with it, every λ combination's next-token
    distributions stay closer to the base model's, while the targets are still met."""
    import torch

    from meav_merge.evaluation.search import ExactEvaluator
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.training.composed import _queries, attach_reference, fluency_kl, response_logprobs
    from meav_merge.training.trunk import split_model
    from meav_merge.vectors.alignment_vector import AlignmentVector
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["base"])
    queries = _queries(tok, _records("medical") + _records("legal"), max_length=96)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["base"], dtype=torch.float32)
    _, base_head = split_model(base, 1)
    attach_reference(base_head, {}, queries, top_k=32)
    drift, met = {}, {}
    level = {-1: "avoidance", 0: "generic", 1: "expert"}
    for weight in (0.0, 30.0):
        cfg = ComposedTrainConfig(steps=150, trainable_layers=1, learning_rate=3e-3, max_length=96,
                                  logging_steps=50, fluency_weight=weight, fluency_top_k=32)
        out = train_composed(tiny_dirs["base"], composed_data, tmp_path / f"run{weight}", list(TOPICS), cfg)
        rm = ReweightableModel(out / "centered", [AlignmentVector.load(out / "vectors" / d) for d in TOPICS])
        ev = ExactEvaluator(rm, str(composed_data), list(TOPICS), split="train")
        kls, hits = [], 0
        for lam in itertools.product((-1, 0, 1), repeat=2):
            fr = ev(lam).fractions
            hits += all(fr[d][level[x]] > 0.5 for d, x in zip(TOPICS, lam))
            rm.set(lam)
            _, head = split_model(rm.model, 1)
            with torch.no_grad():
                kls.append(float(fluency_kl(response_logprobs(head, {}, queries), queries)))
        drift[weight], met[weight] = kls, hits
    assert met[30.0] >= 7, met
    assert sum(drift[30.0]) < 0.7 * sum(drift[0.0]), drift
