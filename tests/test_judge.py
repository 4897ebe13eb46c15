"""Judged generation accuracy: the offline level classifier, the LLM judge, generation, the lm-eval task, the CLI."""

import argparse
import json
import zipfile

import numpy as np
import pytest

from meav_merge.data.schema import load_records
from meav_merge.cli.judge import add_cli
from meav_merge.evaluation.fluency import distinct_2
from meav_merge.evaluation.generation import generate_answers
from meav_merge.evaluation.judge import judged_accuracy
from meav_merge.evaluation.level_classifier import (LEVELS, UNPARSED, Answer, JudgeError, LevelClassifier,
                                                    LevelClassifierConfig, default_classifier, proficiency_records,
                                                    response_answers)
from meav_merge.evaluation.llm_judge import LLMJudge, parse_label
from meav_merge.resources import data_dir

DOMAINS = ("medical", "financial", "legal")


@pytest.fixture(scope="session", autouse=True)
def judge_cache(tmp_path_factory):
    """Keep the classifier cache (also used by the lm-eval task) out of the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("meav_cache")
    mp.setenv("MEAV_MERGE_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def classifier(judge_cache):
    return default_classifier()


@pytest.fixture(scope="session")
def untied_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny model with untied embeddings: with tied ones, greedy decoding only repeats the last token."""
    from tiny import build_model, save

    return save(build_model(tiny_tokenizer, seed=0, tie=False), tiny_tokenizer, tmp_path_factory.mktemp("untied") / "m")


# --- the level classifier --------------------------------------------------------------------------
def test_classifier_learns_the_levels_on_held_out_responses(classifier):
    held = classifier.heldout
    print(f"\nheld-out accuracy: {held}")
    assert held["split"] == "test" and held["n"] == 3 * len(proficiency_records(data_dir(), "test"))
    assert held["overall"] >= 0.7  # chance is 1/3
    assert all(acc >= 0.6 for acc in held["per_level"].values())
    # and it is a real classifier: recomputing on the test records gives the same numbers
    assert classifier.heldout_accuracy(proficiency_records(data_dir(), "test"))["overall"] == held["overall"]


def test_classifier_refuses_its_own_training_records(classifier):
    train = load_records(data_dir(), "medical", "train")
    with pytest.raises(JudgeError, match="used to train"):
        classifier.heldout_accuracy(train, split="train")


def test_hand_applied_model_matches_sklearn(classifier):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, gold = response_answers(proficiency_records(data_dir(), "train"))
    test, _ = response_answers(proficiency_records(data_dir(), "test"))
    cfg = classifier.config
    vec = TfidfVectorizer(ngram_range=cfg.ngram_range, sublinear_tf=cfg.sublinear_tf, min_df=cfg.min_df)
    lr = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit(vec.fit_transform([a.text for a in train]), gold)
    texts = [a.text for a in test] + ["Please ask your doctor.", "Take 5 mg once daily and recheck in 4 weeks."]
    np.testing.assert_allclose(classifier.predict_proba(texts), lr.predict_proba(vec.transform(texts)), atol=1e-6)


def test_save_load_round_trip_without_pickle(classifier, tmp_path):
    path = classifier.save(tmp_path / "clf")
    assert sorted(p.name for p in path.iterdir()) == ["classifier.json", "classifier.npz"]
    with zipfile.ZipFile(path / "classifier.npz") as z:  # plain arrays: np.load(allow_pickle=False) reads it
        assert all(n.endswith(".npy") for n in z.namelist())
    loaded = LevelClassifier.load(path)
    texts = [a.text for a in response_answers(load_records(data_dir(), "legal", "test"))[0]]
    texts += ["I'm sorry, I can't help with that.", "", "Generally it helps to keep records."]
    assert loaded.predict(texts) == classifier.predict(texts)
    np.testing.assert_array_equal(loaded.predict_proba(texts), classifier.predict_proba(texts))
    assert loaded.heldout == classifier.heldout and loaded.trained_on == classifier.trained_on
    with pytest.raises(FileExistsError):
        classifier.save(path)


def test_load_rejects_a_damaged_file(classifier, tmp_path):
    path = classifier.save(tmp_path / "clf")
    meta = json.loads((path / "classifier.json").read_text())
    meta["vocabulary"] = meta["vocabulary"][:-1]
    (path / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(JudgeError, match="shapes"):
        LevelClassifier.load(path)
    with pytest.raises(JudgeError, match="not a saved LevelClassifier"):
        LevelClassifier.load(tmp_path / "nowhere")


def test_default_classifier_is_cached(classifier, judge_cache, monkeypatch):
    entries = list(judge_cache.glob("level_classifier-*"))
    assert len(entries) == 1

    def no_training(self, records):
        raise AssertionError("trained again instead of reading the cache")

    monkeypatch.setattr(LevelClassifier, "fit", no_training)
    again = default_classifier()  # would raise if the cache were not read
    assert again is not classifier and again.vocabulary == classifier.vocabulary
    assert again.heldout == classifier.heldout
    with pytest.raises(AssertionError, match="trained again"):  # a config not in the cache trains
        default_classifier(config=LevelClassifierConfig(C=1.0))


def test_judged_accuracy_fractions(classifier):
    answers = [Answer("a", "medical", "q", "I'm sorry, but I'm not able to advise on this; please talk to your GP."),
               Answer("b", "medical", "q", "   "), "Readings like these are often managed with lifestyle changes."]
    result = judged_accuracy(answers, classifier)
    labels = classifier.judge(answers)
    assert set(LEVELS) <= set(result) and result["n"] == 3
    assert [result[lv] for lv in LEVELS] == pytest.approx([labels.count(lv) / 3 for lv in LEVELS])
    assert result["avoidance"] >= 1 / 3  # the empty answer is avoidance by definition
    assert result["judge"]["heldout_accuracy"]["overall"] == classifier.heldout["overall"]
    assert 0 < result["judge"]["answer_confidence"] <= 1


# --- the LLM judge -------------------------------------------------------------------------------
@pytest.mark.parametrize("reply,label", [
    ("LABEL: expert", "expert"), ("label: Generic.", "generic"), ("**Label:** avoidance", "avoidance"),
    ('{"label": "generic"}', "generic"), ("The answer is avoidance.", "avoidance"),
    ("<think>expert or generic?</think>\nLABEL: generic", "generic"),
    ("It is generic, not expert.", UNPARSED), ("I cannot decide.", UNPARSED), ("", UNPARSED),
])
def test_parse_label(reply, label):
    assert parse_label(reply) == label


def test_llm_judge_against_a_loopback_server():
    from openai_stub import OpenAIStub

    def rule(body):
        answer = body["messages"][-1]["content"]
        if "sorry" in answer:
            return "LABEL: avoidance"
        if "mg" in answer:
            return "Reasoning... LABEL: expert"
        if "weather" in answer:
            return "no idea"
        return "LABEL: generic"

    answers = [Answer("1", "medical", "q", "I'm sorry, I can't help."), Answer("2", "medical", "q", "Take 5 mg daily."),
               Answer("3", "medical", "q", "See a doctor, generally."), Answer("4", "medical", "q", "Nice weather."),
               Answer("5", "medical", "q", "")]
    with OpenAIStub(rule) as stub:
        stub.inject("500")  # a transient failure is retried by the client
        judge = LLMJudge(stub.base_url, "judge-model", concurrency=2)
        judge.backend.backoff = 0.01
        labels = judge.judge(answers)
        result = judged_accuracy(answers, judge, labels)
    assert labels == ["avoidance", "expert", "generic", UNPARSED, "avoidance"]
    assert len(stub.requests) == 4  # the empty answer needs no request
    body = stub.requests[0]
    assert body["temperature"] == 0 and body["model"] == "judge-model"
    assert "avoidance: completely avoids" in body["messages"][0]["content"]
    assert result[UNPARSED] == pytest.approx(0.2) and sum(result[k] for k in judge.labels) == pytest.approx(1.0)
    assert result["judge"]["kind"] == "llm"


def test_llm_judge_heldout_accuracy():
    from openai_stub import OpenAIStub

    records = load_records(data_dir(), "financial", "test")[:4]
    gold = {r.responses[lv]: lv for r in records for lv in LEVELS}

    def rule(body):  # a judge that is right except on every expert response
        level = gold[body["messages"][-1]["content"].split("Answer to grade:\n", 1)[1]]
        return f"LABEL: {'generic' if level == 'expert' else level}"

    with OpenAIStub(rule) as stub:
        judge = LLMJudge(stub.base_url, "m")
        held = judge.heldout_accuracy(records)
    assert held["overall"] == pytest.approx(2 / 3) and held["per_level"]["expert"] == 0
    assert judge.describe()["heldout_accuracy"] == held


# --- generation -------------------------------------------------------------------------------
def test_generate_answers_is_bounded_and_greedy(untied_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype="float32")
    records = load_records(data_dir(), "medical", "test")[:5]
    answers = generate_answers(model, tiny_tokenizer, records, max_new_tokens=12, batch_size=2, progress=False)
    assert [a.id for a in answers] == [r.id for r in records]  # batching sorts by length; order comes back
    longest_token = max(len(tiny_tokenizer.decode([i])) for i in range(len(tiny_tokenizer)))
    for a in answers:
        assert isinstance(a.text, str) and a.text and a.n_tokens == 12 and not a.finished
        assert len(a.text) <= 12 * longest_token
    # greedy and independent of batching/padding
    single = generate_answers(model, tiny_tokenizer, records, max_new_tokens=12, batch_size=1, progress=False)
    assert [a.text for a in single] == [a.text for a in answers]


def test_generate_answers_with_a_system_prompt_per_record(untied_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype="float32")
    records = load_records(data_dir(), "medical", "test")[:3]
    systems = [None, "Answer as a doctor.", "Refuse politely."]
    mixed = generate_answers(model, tiny_tokenizer, records * 3, max_new_tokens=8,
                             system=[s for s in systems for _ in records], batch_size=9, progress=False)
    for i, s in enumerate(systems):  # one batch of every prompt = each prompt on its own
        alone = generate_answers(model, tiny_tokenizer, records, max_new_tokens=8, system=s, progress=False)
        assert [a.text for a in mixed[3 * i: 3 * i + 3]] == [a.text for a in alone]
    assert len({a.text for a in mixed[:3]} | {a.text for a in mixed[3:6]}) > 3  # the prompt mattered
    with pytest.raises(JudgeError, match="2 system prompts for 3 records"):
        generate_answers(model, tiny_tokenizer, records, max_new_tokens=2, system=systems[:2], progress=False)


def test_generate_answers_stops_at_an_end_token(untied_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from meav_merge.evaluation.scoring import chat_context

    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype="float32")
    record = load_records(data_dir(), "medical", "test")[0]
    free = generate_answers(model, tiny_tokenizer, [record], max_new_tokens=6, progress=False)[0]
    assert not free.finished and free.n_tokens == 6
    prompt = tiny_tokenizer(chat_context(tiny_tokenizer, record.query), return_tensors="pt")
    tokens = model.generate(**prompt, max_new_tokens=6, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    # declare the third generated token an end token of this model: the answer stops before it
    model.generation_config.eos_token_id = tokens[2]
    stopped = generate_answers(model, tiny_tokenizer, [record], max_new_tokens=6, progress=False)[0]
    assert stopped.finished and stopped.n_tokens == tokens.index(tokens[2]) < 6
    assert stopped.text == tiny_tokenizer.decode(tokens[:stopped.n_tokens], skip_special_tokens=True).strip()


# --- lm-eval ------------------------------------------------------------------------------------
def test_lm_eval_meav_gen_task_end_to_end(untied_dir, tiny_tokenizer, classifier):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = {"pretrained": str(untied_dir), "device": "cpu", "dtype": "float32"}
    tm = TaskManager(metadata=model_args)  # what simple_evaluate builds itself when given none
    assert {"meav_gen", "meav_gen_medical", "meav_gen_financial", "meav_gen_legal"} <= set(tm.all_tasks)
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=["meav_gen_medical"], limit=3,
                                  task_manager=tm)
    res = out["results"]["meav_gen_medical"]
    fractions = [res[f"{m},none"] for m in ("gen_acc_exp", "gen_acc_gen", "gen_acc_avd")]
    assert sum(fractions) == pytest.approx(1.0) and all(0 <= f <= 1 for f in fractions)
    assert res["judge_heldout_acc,none"] >= 0.7
    # the task's prompt and judge are the package's: same answers, same labels as generate_answers
    from transformers import AutoModelForCausalLM

    samples = sorted(out["samples"]["meav_gen_medical"], key=lambda s: s["doc_id"])
    records = load_records(data_dir(), "medical", "test")[:3]
    assert [s["doc"]["id"] for s in samples] == [r.id for r in records]
    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype="float32")
    ours = generate_answers(model, tiny_tokenizer, records, max_new_tokens=128, progress=False)
    assert [s["filtered_resps"][0].strip() for s in samples] == [a.text for a in ours]
    labels = classifier.judge(ours)
    assert fractions == pytest.approx([labels.count(lv) / 3 for lv in LEVELS])


def _gen_utils():
    import importlib.util

    from meav_merge.resources import eval_tasks_dir

    spec = importlib.util.spec_from_file_location("meav_gen_utils", eval_tasks_dir() / "meav_gen" / "gen_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lm_eval_docs_come_from_a_data_file_override(untied_dir, tiny_tokenizer, tmp_path):
    from meav_merge.evaluation.scoring import chat_context

    records = load_records(data_dir(), "legal", "test")[:2]
    own = tmp_path / "mine.jsonl"
    own.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    docs = _gen_utils().load_docs(domain="legal", pretrained=str(untied_dir), data_file=str(own), version=1.0)["test"]
    assert docs["id"] == [r.id for r in records]
    assert docs["prompt"] == [chat_context(tiny_tokenizer, r.query) for r in records]
    with pytest.raises(ValueError, match="pretrained=DIR"):
        _gen_utils().load_docs(domain="legal")


# --- CLI ----------------------------------------------------------------------------------------
def _parser():
    parser = argparse.ArgumentParser(prog="meav")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_writes_answers_and_fractions(untied_dir, tmp_path, capsys, classifier):
    out = tmp_path / "judged"
    args = _parser().parse_args(["judge", "--model", str(untied_dir), "--domain", "legal", "--n", "3",
                                 "--max-new-tokens", "8", "--out", str(out), "--reference", str(untied_dir)])
    args.func(args)
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    result = json.loads((out / "judged.json").read_text())
    assert [r["id"] for r in rows] == [r.id for r in load_records(data_dir(), "legal", "test")[:3]]
    assert all(r["label"] in LEVELS and r["n_tokens"] <= 8 for r in rows)
    assert result["n"] == 3 and sum(result[lv] for lv in LEVELS) == pytest.approx(1.0)
    assert [result[lv] for lv in LEVELS] == pytest.approx([sum(r["label"] == lv for r in rows) / 3 for lv in LEVELS])
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and f"{classifier.heldout['overall']:.3f}" in printed
    flu = result["fluency"]
    assert flu["distinct_2"] == pytest.approx(sum(distinct_2(r["answer"]) for r in rows) / 3)
    assert flu["reference_logprob"] < 0 and flu["reference"] == str(untied_dir)
    assert f"mean log-prob under the unsteered {untied_dir} {flu['reference_logprob']:.2f}" in printed
    with pytest.raises(FileExistsError):  # refuses before generating anything
        args.func(args)


def test_fluency_reference_logprob_is_the_answers_mean_logprob_after_its_prompt(untied_dir, tiny_tokenizer):
    # checked against one plain forward pass over prompt + answer
    import torch
    from transformers import AutoModelForCausalLM

    from meav_merge.evaluation.fluency import reference_logprobs
    from meav_merge.evaluation.scoring import chat_context, encode_pair

    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype="float32")
    records = load_records(data_dir(), "medical", "test")[:3]
    answers = generate_answers(model, tiny_tokenizer, records, max_new_tokens=10, progress=False)
    got = reference_logprobs(model, tiny_tokenizer, answers)
    for a, value in zip(answers, got):
        ctx_text = chat_context(tiny_tokenizer, a.query)
        ctx, ws = encode_pair(tiny_tokenizer, ctx_text, "")
        _, cont = encode_pair(tiny_tokenizer, ctx_text, a.text)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
        own = [logp[len(ctx) + i - 1, t] for i, t in enumerate(cont)][len(ws):]
        assert value == pytest.approx(float(sum(own) / len(own)), abs=1e-4)


def test_repetition_penalty_reaches_generation(untied_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(untied_dir), dtype="float32")
    records = load_records(data_dir(), "medical", "test")[:3]
    plain = generate_answers(model, tiny_tokenizer, records, max_new_tokens=24, progress=False)
    penalised = generate_answers(model, tiny_tokenizer, records, max_new_tokens=24, progress=False,
                                 repetition_penalty=1e4)
    assert [a.text for a in plain] != [a.text for a in penalised]
    again = generate_answers(model, tiny_tokenizer, records, max_new_tokens=24, progress=False, repetition_penalty=1e4)
    assert [a.text for a in again] == [a.text for a in penalised]  # still deterministic


def test_distinct_2_flags_loops():
    assert distinct_2("the cat sat on the mat") == 1.0
    assert distinct_2("in in in in in") == pytest.approx(1 / 4)


def test_cli_rejects_bad_arguments(untied_dir, tmp_path):
    p = _parser()
    args = p.parse_args(["judge", "--model", str(untied_dir), "--domain", "legal", "--vector", "v=dir",
                         "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--lambda: give one NAME=VALUE per --vector"):
        args.func(args)
    args = p.parse_args(["judge", "--model", str(untied_dir), "--domain", "legal", "--vector", "v=dir",
                         "--lambda", "w=1", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match=r"vectors: v; got: w"):
        args.func(args)
    args = p.parse_args(["judge", "--model", str(untied_dir), "--domain", "legal", "--judge", "llm",
                         "--out", str(tmp_path / "o")])
    with pytest.raises(JudgeError, match="--base-url and --judge-model"):
        args.func(args)


@pytest.mark.integration
def test_embedded_model_answers_and_is_judged(embedded_model, classifier):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_model))
    model = AutoModelForCausalLM.from_pretrained(str(embedded_model), dtype="float32")
    records = load_records(data_dir(), "medical", "test")[:2]
    answers = generate_answers(model, tok, records, max_new_tokens=16, progress=False)
    assert all(0 < a.n_tokens <= 16 and sum(c.isalpha() for c in a.text) > 10 for a in answers)
    result = judged_accuracy(answers, classifier)
    assert sum(result[lv] for lv in LEVELS) == pytest.approx(1.0) and result["n"] == 2
