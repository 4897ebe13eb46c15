"""AWOT: anchors, closed form vs iterative, hooks during generate, evaluations (tiny models)."""

import argparse
import csv
import json

import pytest
import torch

from meav_merge.awot import (
    ANCHOR_SETS,
    AnchorError,
    AWOTConfig,
    AWOTConfigError,
    AWOTLogitsProcessor,
    AWOTSteering,
    anchor_direction,
    anchor_logit_gap,
    anchors_from_words,
    automatic_anchors,
    awot_steering,
    final_norm,
    load_causal_lm,
    manual_anchors,
    step_coefficient,
)
from meav_merge.awot.anchors import read_anchor_file, single_token_forms, token_log_ratios
from meav_merge.evaluation.scoring import preference_accuracy

PROMPT = "I have a question about my blood pressure medication"
EXAMPLES = [  # (prompt, chosen, rejected), in the tiny tokenizer's corpus language
    ("I have a question about my blood pressure medication.", "Please consult a qualified professional.",
     "I'm sorry, I can't help with that."),
    ("The landlord kept my security deposit.", "Generally, it is a good idea to save an emergency fund.",
     "Take 500 mg twice a day with food."),
    ("Tell me about my tax return.", "Please see an expert about your retirement account.",
     "the of and to in is you that it for on with"),
]


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    from tiny import build_model

    return build_model(tiny_tokenizer, seed=0), tiny_tokenizer


@pytest.fixture(scope="module")
def anchors(tiny_tokenizer):
    return anchors_from_words(tiny_tokenizer, ["of", "for", "with"], ["and", "to", "that"], "test words")


def _ids(tok, text=PROMPT):
    return torch.tensor([tok.encode(text)])


@torch.no_grad()
def _logits(model, ids, steering=None):
    if steering is None:
        return model(ids).logits
    with steering:
        return model(ids).logits


# --- anchors ---------------------------------------------------------------------------------------

def test_single_token_words_are_found_and_multi_token_words_reported(tiny_tokenizer):
    a = anchors_from_words(tiny_tokenizer, ["of", "zyxqwv"], ["and", "blorptastic"], "words")
    for tid, form in zip(a.positive_ids + a.negative_ids, a.positive_tokens + a.negative_tokens):
        assert tiny_tokenizer.encode(form, add_special_tokens=False) == [tid]
    assert tiny_tokenizer.encode(" of", add_special_tokens=False)[0] in a.positive_ids
    assert {s.split(":")[0] for s in a.skipped} == {"'zyxqwv' (positive)", "'blorptastic' (negative)"}
    assert "zyxqwv" in a.describe() and "blorptastic" in a.describe()


def test_no_usable_word_is_an_error_listing_the_words(tiny_tokenizer):
    with pytest.raises(AnchorError, match="no usable positive anchor.*zyxqwv"):
        anchors_from_words(tiny_tokenizer, ["zyxqwv"], ["and"], "words")


def test_named_set_resolves_every_table1_word(tiny_tokenizer):
    # The tiny BPE splits every sentiment word, so resolving the named set must fail and name
    # each of its words with its side: the set the name stands for is what gets tokenized.
    pos, neg = ANCHOR_SETS["sentiment"]  # Table 1
    with pytest.raises(AnchorError) as err:
        manual_anchors("sentiment", tiny_tokenizer)
    msg = str(err.value)
    assert msg.startswith("set 'sentiment'") and "\n" not in msg
    assert all(f"'{w}' (negative)" in msg for w in neg)  # none of them is one token here
    for w in pos:  # a positive word is reported unless some form of it is a single token here
        assert (f"'{w}' (positive)" in msg) != bool(single_token_forms(tiny_tokenizer, w))


def test_anchor_file(tmp_path, tiny_tokenizer):
    good = tmp_path / "anchors.json"
    good.write_text(json.dumps({"positive": ["of", "with"], "negative": ["and"]}))
    a = manual_anchors(str(good), tiny_tokenizer)
    assert a.source == str(good) and len(a.negative_ids) >= 1
    assert a.positive_ids == anchors_from_words(tiny_tokenizer, ["of", "with"], ["and"], "x").positive_ids
    cases = {"bad.json": ("{not json", "invalid JSON"),
             "missing.json": (json.dumps({"positive": ["of"]}), "key 'negative'"),
             "typo.json": (json.dumps({"positive": ["of"], "negative": ["and"], "neutral": []}), "unknown key 'neutral'"),
             "nonstr.json": (json.dumps({"positive": ["of", 3], "negative": ["and"]}), r"'positive'\[1\]")}
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(AnchorError, match=msg) as e:
            read_anchor_file(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(AnchorError, match="not a named anchor set"):
        manual_anchors(str(tmp_path / "nope.json"), tiny_tokenizer)


def test_automatic_anchors_pick_the_highest_log_ratios(tiny_dirs, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["base"])).eval()
    aligned = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["aligned_a"])).eval()
    k = 3
    a = automatic_anchors(aligned, base, tiny_tokenizer, EXAMPLES, top_k=k, progress=False)
    ratios = token_log_ratios(aligned, base, tiny_tokenizer, EXAMPLES, progress=False)

    # Reference: log π*/π_ref of every response token, from one full-sequence forward pass each.
    from meav_merge.evaluation.scoring import chat_context, encode_pair

    ref = {"chosen": {}, "rejected": {}}
    for prompt, chosen, rejected in EXAMPLES:
        for level, resp in (("chosen", chosen), ("rejected", rejected)):
            context = chat_context(tiny_tokenizer, prompt)
            ctx, cont = encode_pair(tiny_tokenizer, context, resp)
            n_ws = len(encode_pair(tiny_tokenizer, context, "")[1])  # the context's moved trailing whitespace
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = [torch.log_softmax(m(ids).logits[0], -1) for m in (aligned, base)]
            for pos in range(len(ctx) + n_ws, len(ctx) + len(cont)):
                tid = ids[0, pos].item()
                r = (lp[0][pos - 1, tid] - lp[1][pos - 1, tid]).item()
                ref[level].setdefault(tid, []).append(r)
    mean = {lv: {t: sum(v) / len(v) for t, v in d.items()} for lv, d in ref.items()}
    for lv in ("chosen", "rejected"):
        for t, values in ratios[lv].items():
            assert sum(values) / len(values) == pytest.approx(mean[lv][t], abs=1e-4)
    top_pos = sorted(mean["chosen"], key=lambda t: -mean["chosen"][t])[:k]
    top_neg = sorted(mean["rejected"], key=lambda t: mean["rejected"][t])[:k]
    assert a.positive_ids == top_pos and a.negative_ids == top_neg
    assert a.scores[a.positive_ids[0]] > a.scores[a.positive_ids[-1]] > a.scores[a.negative_ids[-1]]


def test_automatic_anchors_need_one_vocabulary(tiny_tokenizer):
    from tiny import build_model, build_tokenizer

    small = build_model(build_tokenizer(vocab_size=300))
    with pytest.raises(AnchorError, match="different vocabularies"):
        automatic_anchors(small, build_model(tiny_tokenizer), tiny_tokenizer, EXAMPLES, progress=False)


# --- the update rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,steps,penalty", [(2.0, 60, 0.0), (0.5, 7, 0.3), (0.25, 40, 2.0), (1.0, 5, 1.0)])
def test_step_coefficient_is_the_unrolled_recursion(alpha, steps, penalty):
    g = 0.0  # offset along d: g ← g + α(1 − 2λ g)
    for _ in range(steps):
        g = g + alpha * (1.0 - 2.0 * penalty * g)
    assert step_coefficient(alpha, steps, penalty) == pytest.approx(g, rel=1e-12)


@pytest.mark.parametrize("penalty", [0.0, 0.005])  # 0.005: c = 35 instead of 120
def test_closed_form_equals_iterative_on_logits(tiny, anchors, penalty):
    model, tok = tiny
    ids = _ids(tok)
    plain = _logits(model, ids)
    closed = _logits(model, ids, awot_steering(model, anchors, AWOTConfig(2.0, 60, penalty, "closed_form")))
    iterative = _logits(model, ids, awot_steering(model, anchors, AWOTConfig(2.0, 60, penalty, "iterative")))
    assert (closed - plain).abs().max() > 0.1  # the steering is not negligible here
    assert torch.allclose(closed, iterative, atol=1e-4, rtol=0)
    with torch.inference_mode(), awot_steering(model, anchors, AWOTConfig(2.0, 60, penalty, "iterative")):
        assert torch.allclose(model(ids).logits, iterative, atol=1e-6)  # autograd is re-enabled inside the hook
    # Every position moves by the same logit vector c·W d.
    wd = model.get_output_embeddings().weight.detach() @ anchor_direction(model, anchors)
    assert torch.allclose(closed - plain, step_coefficient(2.0, 60, penalty) * wd.expand_as(plain), atol=1e-4)


def _greedy(tok, n):
    return dict(max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id)


def test_generation_moves_the_anchor_gap_by_the_predicted_amount(tiny, anchors):
    model, tok = tiny
    ids = _ids(tok)
    kw = _greedy(tok, 6)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        gaps = {}
        for method in ("closed_form", "iterative"):
            with awot_steering(model, anchors, AWOTConfig(2.0, 60, 0.0, method)) as s:
                out = model.generate(ids, **kw)
            gaps[method] = anchor_logit_gap(out.logits[0][0], anchors) - anchor_logit_gap(plain.logits[0][0], anchors)
            # Later steps (KV cache, one new position each) are steered too: vs an unsteered forward of the same tokens.
            seq = out.sequences
            unsteered = model(seq[:, :-1]).logits[0, ids.shape[1] - 1:]
            steered = torch.stack([x[0] for x in out.logits])
            shift = anchor_logit_gap(steered, anchors) - anchor_logit_gap(unsteered, anchors)
            assert torch.allclose(shift, torch.full_like(shift, s.predicted_gap_shift()), atol=1e-3)
    predicted = s.predicted_gap_shift()
    assert predicted > 1.0
    assert gaps["closed_form"].item() == pytest.approx(predicted, abs=1e-4)
    assert gaps["iterative"].item() == pytest.approx(predicted, abs=1e-4)


@pytest.mark.parametrize("cfg", [AWOTConfig(0.0, 60, 0.0, "closed_form"), AWOTConfig(0.0, 60, 0.0, "iterative"),
                                 AWOTConfig(2.0, 0, 0.0, "iterative"), AWOTConfig(0.0, 60, 0.0, "iterative", "pre_norm")])
def test_zero_step_leaves_the_model_bit_identical(tiny, anchors, cfg):
    model, tok = tiny
    ids = _ids(tok)
    kw = _greedy(tok, 5)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with awot_steering(model, anchors, cfg):
            steered = model.generate(ids, **kw)
            logits = model(ids).logits
        assert torch.equal(logits, model(ids).logits)
    assert torch.equal(plain.sequences, steered.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, steered.logits))


def test_pre_norm_requires_the_iterative_path(tiny, anchors):
    from meav_merge.cli.awot import _awot_config

    with pytest.raises(AWOTConfigError, match="pre_norm.*iterative"):
        AWOTConfig(method="closed_form", state="pre_norm")
    args = argparse.Namespace(alpha=1.0, steps=5, penalty=0.0, method=None, state="pre_norm")
    assert _awot_config(args).method == "iterative"
    model, tok = tiny
    with pytest.raises(AWOTConfigError, match="LM-head input"):
        AWOTLogitsProcessor(model, anchors, AWOTConfig(method="iterative", state="pre_norm"))
    steering = AWOTSteering(model, anchors, AWOTConfig(1.0, 20, 0.0, "iterative", "pre_norm"))
    assert steering.module is final_norm(model) is model.model.norm
    ids = _ids(tok)
    plain = _logits(model, ids)
    steered = _logits(model, ids, awot_steering(model, anchors, steering.config))
    gain = anchor_logit_gap(steered, anchors) - anchor_logit_gap(plain, anchors)
    assert (gain > 0.1).all()  # every position's value distinction grows
    closed = _logits(model, ids, awot_steering(model, anchors, AWOTConfig(1.0, 20)))
    assert not torch.allclose(steered, closed, atol=1e-3)  # a different state, a different update


def test_bad_configs_are_rejected():
    with pytest.raises(AWOTConfigError, match="diverges"):
        AWOTConfig(alpha=2.0, penalty=1.0)
    with pytest.raises(AWOTConfigError, match="method"):
        AWOTConfig(method="newton")
    with pytest.raises(AWOTConfigError, match="steps"):
        AWOTConfig(steps=-1)


def test_logits_processor_matches_the_hook(tiny, anchors):
    model, tok = tiny
    ids = _ids(tok)
    cfg = AWOTConfig(2.0, 60)
    kw = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with awot_steering(model, anchors, cfg):
            hooked = model.generate(ids, **kw)
        processed = model.generate(ids, logits_processor=[AWOTLogitsProcessor(model, anchors, cfg)], **kw)
    assert torch.equal(hooked.sequences, processed.sequences)
    assert not all(torch.allclose(a, b) for a, b in zip(plain.scores, processed.scores))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(hooked.scores, processed.scores))


# --- evaluations and CLI -------------------------------------------------------------------------------

def test_eval_sentiment_tiny(tmp_path, tiny_dirs):
    from meav_merge.awot.evaluate import SentimentEvalConfig, evaluate_sentiment

    prompts = tmp_path / "openings.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"m{i}", "text": t}) + "\n" for i, t in
                               enumerate(["The landlord kept my", "Take 500 mg twice a", "Please consult a"])))
    words = tmp_path / "anchors.json"
    words.write_text(json.dumps({"positive": ["of", "with"], "negative": ["and", "to"]}))
    cfg = SentimentEvalConfig(n=3, max_new_tokens=4, anchors=str(words), batch_size=2, alpha=2.0, steps=60)
    out = tmp_path / "eval"
    summary = evaluate_sentiment(tiny_dirs["base"], out, cfg, prompts=prompts, progress=False)
    assert [s["method"] for s in summary] == list(cfg.all_methods)
    assert summary[0]["method"] == "base" and summary[0]["time_ratio_to_greedy"] == 1.0
    assert all(s["n"] == 3 and s["s_per_token"] > 0 for s in summary)
    rows = list(csv.DictReader(open(out / "generations.csv")))
    assert len(rows) == 15
    by = {(r["id"], r["method"]): r for r in rows}
    for i in range(3):  # the two AWOT paths generate the same text; AWOT changes it
        assert by[(f"m{i}", "awot_iterative")]["text"] == by[(f"m{i}", "awot_closed_form")]["text"]
    assert any(by[(f"m{i}", "awot_closed_form")]["text"] != by[(f"m{i}", "base")]["text"] for i in range(3))
    meta = json.loads((out / "summary.json").read_text())
    assert meta["config"]["alpha"] == 2.0 and "| awot_closed_form |" in (out / "summary.md").read_text()
    with pytest.raises(FileExistsError):
        evaluate_sentiment(tiny_dirs["base"], out, cfg, prompts=prompts, progress=False)


def _safety_file(path):
    texts = ["Please consult a qualified professional about that.", "I'm sorry, I can't help with that.",
             "Generally, it is a good idea to save an emergency fund.", "Take 500 mg twice a day with food."]
    lines = []
    for i in range(8):
        lines.append({"id": f"s{i}", "domain": "safety", "query": f"Question {i} about my blood pressure",
                      "safe": texts[i % 2] + f" Case {i}.", "unsafe": texts[2 + i % 2] + f" Case {i}.",
                      "split": "test" if i < 3 else "train"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_eval_hh_tiny(tmp_path, tiny_dirs):
    from meav_merge.awot.evaluate import evaluate_hh

    data = _safety_file(tmp_path / "safety.jsonl")
    res = evaluate_hh(tiny_dirs["base"], tiny_dirs["aligned_a"], data, AWOTConfig(2.0, 60), top_k=3, progress=False)
    assert res["n_test"] == 3 and len(res["anchors"]["positive_ids"]) == 3
    # the reported accuracies are the win fractions of the reported scores, with and without AWOT
    assert res["accuracy"] == pytest.approx(preference_accuracy(res["scores"], res["levels"]))
    assert res["accuracy_awot"] == pytest.approx(preference_accuracy(res["scores_awot"], res["levels"]))
    assert res["scores"] != res["scores_awot"]  # scoring saw the hook
    off = evaluate_hh(tiny_dirs["base"], tiny_dirs["aligned_a"], data, AWOTConfig(0.0, 60), top_k=3, progress=False)
    assert off["scores"] == off["scores_awot"] == res["scores"]


def _parser():
    from meav_merge.cli.awot import add_cli

    parser = argparse.ArgumentParser(prog="meav")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_generate(tmp_path, tiny_dirs, capsys):
    words = tmp_path / "anchors.json"
    words.write_text(json.dumps({"positive": ["of", "with", "zyxqwv"], "negative": ["and"]}))
    base = ["awot", "generate", "--model", str(tiny_dirs["base"]), "--prompt", "Tell me about my tax return",
            "--max-new-tokens", "4"]
    args = _parser().parse_args(base + ["--anchors", str(words), "--alpha", "2", "--steps", "60"])
    args.func(args)
    captured = capsys.readouterr()
    assert "zyxqwv" in captured.err  # the skipped word is reported
    # what it prints is the steered greedy reply: the same as generating under the hook directly
    from meav_merge.awot.evaluate import generate
    from meav_merge.evaluation.scoring import chat_context

    model, tok = load_causal_lm(tiny_dirs["base"])
    prompt = chat_context(tok, "Tell me about my tax return")
    with awot_steering(model, manual_anchors(str(words), tok), AWOTConfig(2.0, 60)):
        steered = generate(model, tok, prompt, 4, 1.5).texts[0]
    plain = generate(model, tok, prompt, 4, 1.5).texts[0]
    assert captured.out == steered + "\n" and steered != plain
    args = _parser().parse_args(base + ["--anchors", str(words), "--state", "pre_norm", "--method", "closed_form"])
    with pytest.raises(AWOTConfigError):
        args.func(args)
    args = _parser().parse_args(base + ["--anchors", f"auto:{tiny_dirs['aligned_a']}"])
    with pytest.raises(AnchorError, match="--auto-data"):
        args.func(args)


@pytest.mark.integration
def test_embedded_model_sentiment_anchors_and_closed_form(embedded_model):
    from meav_merge.awot import load_causal_lm

    model, tok = load_causal_lm(embedded_model)
    a = manual_anchors("sentiment", tok)
    assert not a.skipped  # every Table 1 word is one token with a leading space in SmolLM2's vocabulary
    assert len(a.positive_ids) >= 9 and len(a.negative_ids) >= 9
    ids = torch.tensor([tok.encode("Here is a movie review from imdb: The plot was")])
    plain = _logits(model, ids)
    closed = _logits(model, ids, awot_steering(model, a, AWOTConfig(0.05, 60)))
    iterative = _logits(model, ids, awot_steering(model, a, AWOTConfig(0.05, 60, method="iterative")))
    assert torch.allclose(closed, iterative, atol=1e-3)
    gain = anchor_logit_gap(closed, a) - anchor_logit_gap(plain, a)
    s = AWOTSteering(model, a, AWOTConfig(0.05, 60))
    assert torch.allclose(gain, torch.full_like(gain, s.predicted_gap_shift()), atol=1e-3)


def test_cli_auto_anchors_and_eval_hh(tmp_path, tiny_dirs, capsys):
    data = _safety_file(tmp_path / "safety.jsonl")
    args = _parser().parse_args(["awot", "generate", "--model", str(tiny_dirs["base"]), "--prompt", "Hello",
                                 "--anchors", f"auto:{tiny_dirs['aligned_a']}", "--auto-data", str(data),
                                 "--top-k", "2", "--max-new-tokens", "3"])
    args.func(args)
    err = capsys.readouterr().err
    assert "2 positive, 2 negative" in err and "(train, 5 pairs)" in err  # anchors come from the train split only
    out = tmp_path / "hh"
    args = _parser().parse_args(["awot", "eval-hh", "--model", str(tiny_dirs["base"]), "--aligned",
                                 str(tiny_dirs["aligned_a"]), "--data", str(data), "--top-k", "2", "--out", str(out)])
    args.func(args)
    res = json.loads((out / "hh.json").read_text())
    assert res["awot"] == {"alpha": 0.5, "steps": 60, "penalty": 0.0, "method": "closed_form",
                           "state": "lm_head_input"}  # the paper's HH setting by default
    assert "with AWOT" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        args.func(args)
