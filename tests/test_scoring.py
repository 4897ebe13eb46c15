import pytest
import torch

from meav_merge.data.schema import parse_record
from meav_merge.evaluation.scoring import (_shared_prefix, chat_context, dominant, encode_pair, mean_logprobs,
                                          preference_accuracy, prepare, winners)


def _recs():
    texts = ["Take 500 mg twice a day with food.", "It is a good idea to see your doctor about this soon please.",
             "Sorry, I can't help.", "Generally, save three to six months of expenses in an emergency fund first."]
    out = []
    for i in range(5):
        out.append(parse_record({"id": f"r{i}", "domain": "medical", "persona": "p",
                                 "query": "I have a question " + "about my tax return " * (i + 1),
                                 "expert": texts[i % 4], "generic": texts[(i + 1) % 4], "avoidance": texts[(i + 2) % 4]},
                                f"x:{i}"))
    return out


def naive(model, tok, q):
    rows = []
    for c in q.continuations:
        ids = torch.tensor([q.context_ids + c])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        n = len(q.context_ids)
        toks = [lp[n - 1 + j, c[j]] for j in range(len(c))][q.n_whitespace:]
        rows.append(float(sum(toks) / len(toks)))
    return rows


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_prefix_scoring_equals_separate_forward_passes(tiny_dirs, batch_size):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dirs["base"]))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["base"]), dtype=torch.float32).eval()
    prepared = prepare(tok, _recs())
    assert _shared_prefix([q.context_ids for q in prepared]) > 0  # batches run a shared prefix once
    got = mean_logprobs(model, tok, prepared, progress=False, batch_size=batch_size)
    for q, row in zip(prepared, got):
        assert row == pytest.approx(naive(model, tok, q), abs=1e-5)


@pytest.mark.parametrize("vocab_slice", [1, 7, 100, 384, 4096])
def test_token_logprobs_in_vocabulary_slices_equals_log_softmax(vocab_slice):
    from meav_merge.evaluation.scoring import token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 384, bias=True)
    hidden = torch.randn(29, 16, requires_grad=True)
    targets = torch.randint(0, 384, (29,))
    targets[:3] = torch.tensor([0, 383, 256])  # the first and last token, and a slice boundary
    want = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None])[:, 0]
    got = token_logprobs(head, hidden, targets, vocab_slice=vocab_slice)
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-5)
    (g_want,) = torch.autograd.grad(want.sum(), hidden)
    (g_got,) = torch.autograd.grad(got.sum(), hidden)
    assert torch.allclose(g_got, g_want, atol=1e-5)


def test_a_model_whose_logits_are_not_a_linear_head_is_scored_from_its_logits(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from meav_merge.evaluation.scoring import _head_is_linear

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2,
                                       n_positions=256)).eval()
    assert not _head_is_linear(model)  # not a decoder layout the hidden-state path knows
    prepared = prepare(tiny_tokenizer, _recs())
    got = mean_logprobs(model, tiny_tokenizer, prepared, progress=False, batch_size=3)
    for q, row in zip(prepared, got):
        assert row == pytest.approx(naive(model, tiny_tokenizer, q), abs=1e-5)


def test_a_sliding_window_model_is_scored_exactly(tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from meav_merge.layers import sliding_window

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=256)
    model = MistralForCausalLM(cfg).eval()
    assert sliding_window(model.config) == 8  # far shorter than these queries: 3 to a batch was off by 0.013
    prepared = prepare(tiny_tokenizer, _recs())
    got = mean_logprobs(model, tiny_tokenizer, prepared, progress=False, batch_size=3)
    for q, row in zip(prepared, got):
        assert row == pytest.approx(naive(model, tiny_tokenizer, q), abs=1e-5)


def test_encode_pair_moves_trailing_whitespace(tiny_tokenizer):
    ctx = chat_context(tiny_tokenizer, "hello")
    assert ctx.endswith("assistant\n")
    c_ids, cont = encode_pair(tiny_tokenizer, ctx, "Hi")
    assert tiny_tokenizer.decode(cont).startswith("\n")
    assert c_ids + cont == tiny_tokenizer.encode(ctx + "Hi", add_special_tokens=False)


def test_preference_accuracy_and_dominance():
    levels = ["expert", "generic", "avoidance"]
    scores = [[-1, -2, -3], [-3, -1, -2], [-1, -3, -2], [-2, -3, -1]]
    fr = preference_accuracy(scores, levels)
    assert fr == {"expert": 0.5, "generic": 0.25, "avoidance": 0.25}
    assert sum(fr.values()) == 1
    assert winners(scores, levels) == ["expert", "generic", "expert", "avoidance"]
    assert dominant(fr) == "expert"
    assert dominant({"expert": 0.33, "generic": 0.33, "avoidance": 0.34}) == "avoidance"
    assert dominant({"expert": 0.3, "generic": 0.3, "avoidance": 0.3}) is None
    # a tie for the highest is not dominant: no level wins by being listed first
    assert dominant({"expert": 0.167, "generic": 0.417, "avoidance": 0.417}) is None
    assert dominant({"expert": 0.417, "generic": 0.417, "avoidance": 0.167}) is None


def _vector_changing(tiny_dirs, tiny_tokenizer, tmp_path, prefixes):
    """A vector that changes only the tensors whose names start with one of ``prefixes``."""
    from tiny import build_model, save

    from meav_merge.vectors.alignment_vector import extract_vector

    model = build_model(tiny_tokenizer, seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefixes):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    aligned = save(model, tiny_tokenizer, tmp_path / "top_aligned")
    return extract_vector(aligned, tiny_dirs["base"], tmp_path / "top_vector")


def test_frozen_layer_reuse_equals_full_scoring(tiny_dirs, tiny_tokenizer, tmp_path):
    from meav_merge.evaluation.sweep import ReweightableModel

    v = _vector_changing(tiny_dirs, tiny_tokenizer, tmp_path, ("model.layers.1.", "model.norm."))
    fast = ReweightableModel(tiny_dirs["base"], [v])
    plain = ReweightableModel(tiny_dirs["base"], [v], reuse_frozen_layers=False)
    assert fast.scorer is not None and fast.scorer.k == 1 and plain.scorer is None
    assert all(n.startswith(("model.layers.1.", "model.norm.")) for n in fast.changing)
    prepared = prepare(fast.tokenizer, _recs())
    moved = []
    for lam in (0.0, 2.0, -3.0, 2.0):  # back and forth: cached trunk states must stay valid
        fast.set([lam])
        plain.set([lam])
        got, want = fast.score(prepared), plain.score(prepared)
        assert sum(got, []) == pytest.approx(sum(want, []), abs=1e-5)
        moved.append(got[0][0])
    assert abs(moved[1] - moved[0]) > 1e-3  # the vector really changes the scores
    assert fast.scorer.states  # and the bottom layer's states were reused, not recomputed
    fast.scorer.rows_per_batch = 4  # response batches that mix queries' contexts
    mixed = mean_logprobs(fast.model, fast.tokenizer, prepared, progress=False, scorer=fast.scorer)
    assert sum(mixed, []) == pytest.approx(sum(plain.score(prepared), []), abs=1e-5)


def test_frozen_layer_reuse_is_off_when_the_embeddings_change(tiny_dirs, tiny_tokenizer, tmp_path):
    from meav_merge.evaluation.sweep import ReweightableModel

    v = _vector_changing(tiny_dirs, tiny_tokenizer, tmp_path, ("model.embed_tokens.", "model.layers.1."))
    assert ReweightableModel(tiny_dirs["base"], [v]).scorer is None


def test_reweightable_model_scores_each_point_once(tiny_dirs, tiny_tokenizer, tmp_path, monkeypatch):
    import meav_merge.evaluation.sweep as sweep_mod

    v = _vector_changing(tiny_dirs, tiny_tokenizer, tmp_path, ("model.layers.1.", "model.norm."))
    rm = sweep_mod.ReweightableModel(tiny_dirs["base"], [v])
    calls = []
    real = sweep_mod.mean_logprobs
    monkeypatch.setattr(sweep_mod, "mean_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepared = prepare(rm.tokenizer, _recs())
    at_zero = rm.score(prepared)
    rm.set([1.5])
    moved = rm.score(prepared)
    rm.set([0.0])
    again = rm.score(prepared)
    other = rm.score(prepare(rm.tokenizer, _recs(), system="Be brief."))
    assert len(calls) == 3  # λ=0, λ=1.5, and the other prompt; the second λ=0 call was reused
    assert again == at_zero and moved != at_zero and other != at_zero


def test_length_groups_cover_every_row_once_within_the_slack():
    from meav_merge.evaluation.scoring import length_groups

    lengths = [224, 130, 38, 221, 74, 84, 173, 112, 153, 1, 1, 60]
    groups = length_groups(lengths, slack=1.5)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        widths = [lengths[i] for i in g]
        assert widths == sorted(widths) and max(widths) <= 1.5 * min(widths)
    assert len(groups) < len(lengths)  # similar lengths share a batch
