"""`meav data synthesize` and the LLM client, against a real OpenAI-protocol server on loopback."""

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from openai_stub import OpenAIStub

from meav_merge.data.schema import PROFICIENCY_LEVELS, DataError, load_records, parse_record, read_jsonl
from meav_merge.data.synth.llm_client import (ChatResult, LLMRequestError, LLMUnavailableError, OpenAICompatibleBackend,
                                   TransformersBackend)
from meav_merge.data.synth.filters import clean_reply, drop_reason, looks_cut_off, looks_english
from meav_merge.data.synth.prompts import LEVEL_DEFINITIONS, parse_persona_list
from meav_merge.data.synth.pipeline import SynthesisConfig, SynthesisError, add_cli, read_personas, record_id, synthesize

ROOT = Path(__file__).resolve().parent.parent


# --- the canned LLM ----------------------------------------------------------------------------
# Markers in a persona steer what the stub answers for that persona's query and replies:
# TRUNC: expert reply hits max_tokens; CUTQ: the query stops mid-sentence; ESPANOL: the
# generic reply is Spanish; EMPTY: the avoidance reply is blank; DUP: a shared query.
DUP_QUERY = "I'm 52 and my blood pressure was 150/95 at two visits last month. What should I do next?"


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def canned_answer(body: dict):
    content = body["messages"][-1]["content"]
    for level, definition in LEVEL_DEFINITIONS.items():
        if definition in content:
            return _reply(level, content.split("Question:\n", 1)[1])
    if '"persona"' in content:  # CreatePersona: roots or related personas, as a JSON array
        n = int(re.search(r"Create (\d+)", content).group(1))
        parent = re.search(r"^Persona: (.*)$", content, re.M)
        stem = f"relative {_h(parent.group(1))}" if parent else f"root {body['seed']}"
        items = [{"persona": f"A {30 + i}-year-old {stem}-{i} who works as a bus driver in Leeds.",
                  "topic": "a blood pressure question"} for i in range(n)]
        return "Here you go:\n```json\n" + json.dumps(items) + "\n```"
    persona = re.search(r"^Persona: (.*)$", content, re.M).group(1)
    if "DUP" in persona:
        return DUP_QUERY
    if "CUTQ" in persona:
        return "I have a question about my tax return and the amount that I still owe, which is", "stop"
    return f"I am {persona} My home readings average 146/92 over 7 days. Is it reasonable to wait 3 months?"


def _reply(level: str, query: str):
    if level == "expert" and "TRUNC" in query:
        return "Your average of 146/92 is stage 1 hypertension, and the first thing to do is", "length"
    if level == "generic" and "ESPANOL" in query:
        return "En general, es importante que hables con un profesional calificado sobre tu caso concreto."
    if level == "avoidance" and "EMPTY" in query:
        return "   "
    tag = _h(query + level)
    return {
        "expert": f"Ask your GP for your QRISK3 score (ref {tag}); if it is under 10%, a three-month trial of "
                  "cutting alcohol to 14 units a week is reasonable, with home readings below 135/85.",
        "generic": f"Many people with raised readings (ref {tag}) improve them with diet and exercise, but it is "
                   "best to talk to your doctor about what is right for you.",
        "avoidance": f"I'm sorry, but I can't help with this question (ref {tag}). Please speak to a doctor "
                     "who can look at your situation properly.",
    }[level]


def backend(stub, **kw) -> OpenAICompatibleBackend:
    kw = {"timeout": 5, **kw}
    return OpenAICompatibleBackend(stub.base_url, "stub-model", api_key_env="MEAV_TEST_KEY", **kw)


def write_personas(path: Path, personas) -> Path:
    path.write_text("".join(json.dumps({"persona": p}) + "\n" for p in personas))
    return path


def normal_personas(n: int):
    return [f"Person number {i}, a {20 + i}-year-old teacher in Leeds." for i in range(n)]


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="meav")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub.add_parser("data").add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def lines_of(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the pipeline --------------------------------------------------------------------------------
def test_create_persona_run_writes_valid_records_and_reruns_as_noop(tmp_path):
    out = tmp_path / "synth" / "medical.jsonl"
    cfg = SynthesisConfig(domain="medical", n_personas=100, create_persona=True, persona_roots=2,
                          persona_rounds=2, persona_related=2, persona_depth=1, min_words=30, max_words=90,
                          concurrency=2, seed=3)
    with OpenAIStub(canned_answer) as stub:
        summary = synthesize(backend(stub), cfg, out, progress=False)
        persona_calls = [b for b in stub.requests if '"persona"' in b["messages"][-1]["content"]]
        # 2 rounds × (1 roots call + 2 related calls) -> 2×2 roots + 4×2 related personas
        assert len(persona_calls) == 6
        assert summary.personas == 12 and summary.written == 12 and not summary.dropped
        records = lines_of(out)
        assert len({r["id"] for r in records}) == 12
        for i, obj in enumerate(records):
            assert set(obj) == {"id", "domain", "persona", "query", *PROFICIENCY_LEVELS}  # no split
            rec = parse_record(obj, f"{out}:{i + 1}")
            assert rec.id == record_id("medical", rec.persona, 3)
        assert len(read_jsonl(out)) == 12  # loadable as a dataset (splits assigned on load)
        # every reply got its own target length, inside the range, and they vary
        targets = [int(re.search(r"about (\d+) words", b["messages"][-1]["content"]).group(1))
                   for b in stub.requests if "Question:\n" in b["messages"][-1]["content"]]
        assert len(targets) == 36 and all(30 <= t <= 90 for t in targets) and len(set(targets)) > 10
        assert len(list(out.parent.glob(".medical.jsonl.personas-*.json"))) == 1
        # same command again: nothing asked (personas come from the cache), nothing written
        before, n_requests = out.read_bytes(), len(stub.requests)
        again = synthesize(backend(stub), cfg, out, progress=False)
        assert len(stub.requests) == n_requests
        assert (again.written, again.skipped_done) == (0, 12)
        assert out.read_bytes() == before


def test_unusable_persona_answers_are_reported_and_not_cached(tmp_path):
    def no_json(body):
        content = body["messages"][-1]["content"]
        return "Sorry, here are some personas: a nurse, a farmer." if '"persona"' in content else canned_answer(body)

    out = tmp_path / "out.jsonl"
    cfg = SynthesisConfig(create_persona=True, persona_rounds=2, persona_depth=1)
    with OpenAIStub(no_json) as stub:
        summary = synthesize(backend(stub), cfg, out, progress=False)
        assert len(stub.requests) == 2  # one roots call per round, nothing to expand
    assert (summary.personas, summary.written, summary.persona_answers_unusable) == (0, 0, 2)
    assert "2 CreatePersona answers held no usable JSON list" in str(summary)
    assert not list(tmp_path.glob(".out.jsonl.personas-*"))  # a rerun asks again


def test_transient_failures_are_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("MEAV_TEST_KEY", "sk-test")
    with OpenAIStub(canned_answer, retry_after=1.0, slow_s=1.5) as stub:
        stub.inject("500", "429", "drop", "slow")
        client = backend(stub, timeout=0.5)
        t0 = time.monotonic()
        result = client.complete([{"role": "user", "content": "Persona: someone."}], max_tokens=50)
        assert time.monotonic() - t0 >= 1.0  # Retry-After: 1 was honoured
        assert stub.failures_served == ["500", "429", "drop", "slow"]
        assert result.finish_reason == "stop" and result.text.startswith("I am someone.")
        assert stub.auth_headers[-1] == "Bearer sk-test"
        # and a whole run goes through failures sprinkled over its calls
        stub.inject("500", "drop", "500")
        summary = synthesize(client, SynthesisConfig(personas_file=str(write_personas(
            tmp_path / "p.jsonl", normal_personas(2))), concurrency=1), tmp_path / "out.jsonl", progress=False)
        assert summary.written == 2 and len(lines_of(tmp_path / "out.jsonl")) == 2


def test_retries_are_bounded(tmp_path):
    with OpenAIStub(canned_answer) as stub:
        stub.inject("500", "500", "500")
        with pytest.raises(LLMUnavailableError, match=r"gave up after 3 attempts \(HTTP 500: internal error\)"):
            backend(stub, max_retries=2).complete([{"role": "user", "content": "hi"}])
        assert stub.failures_served == ["500"] * 3


def test_client_error_fails_fast_with_a_clear_message(tmp_path):
    personas = write_personas(tmp_path / "p.jsonl", normal_personas(3))
    out = tmp_path / "out.jsonl"
    with OpenAIStub(canned_answer) as stub:
        stub.inject("400")
        t0 = time.monotonic()
        with pytest.raises(LLMRequestError) as err:
            run_cli(["data", "synthesize", "--out", str(out), "--personas", str(personas), "--base-url",
                     stub.base_url, "--model", "no-such-model", "--concurrency", "1"])
        assert time.monotonic() - t0 < 1.0
        assert err.value.status == 400
        msg = str(err.value)
        assert "/v1/chat/completions: HTTP 400" in msg and "The model 'no-such-model' does not exist" in msg
        assert "rerun the same command to resume" in msg
        assert len(stub.auth_headers) == 1  # not retried
        assert not stub.auth_headers[0]  # no key in the environment: no Authorization header


def test_bad_outputs_are_dropped_and_counted(tmp_path):
    personas = normal_personas(3) + ["TRUNC teacher.", "CUTQ teacher.", "ESPANOL teacher.", "EMPTY teacher.",
                                     "DUP teacher one.", "DUP teacher two."]
    cfg = SynthesisConfig(personas_file=str(write_personas(tmp_path / "p.jsonl", personas)), concurrency=3)
    out = tmp_path / "out.jsonl"
    with OpenAIStub(canned_answer) as stub:
        summary = synthesize(backend(stub), cfg, out, progress=False)
    assert summary.dropped == {"truncated": 2, "non_english": 1, "empty": 1, "duplicate_query": 1}
    assert summary.written == 4 and summary.done < summary.target
    kept = [r["persona"] for r in lines_of(out)]
    assert sorted(p for p in kept if "DUP" not in p) == sorted(normal_personas(3))
    assert sum("DUP" in p for p in kept) == 1
    assert [r["query"] for r in lines_of(out)].count(DUP_QUERY) == 1
    text = str(summary)
    assert "wrote 4 records" in text and "duplicate query 1" in text and "personas ran out" in text


def test_concurrency_is_bounded_and_submission_lazy(tmp_path):
    cfg = SynthesisConfig(n_personas=6, concurrency=3,
                          personas_file=str(write_personas(tmp_path / "p.jsonl", normal_personas(10))))
    with OpenAIStub(canned_answer, delay=0.3) as stub:
        summary = synthesize(backend(stub), cfg, tmp_path / "out.jsonl", progress=False)
    assert summary.written == 6
    assert stub.max_in_flight == 3  # used in parallel, never beyond the bound
    assert len(stub.requests) == 6 * 4  # no persona beyond the 6 needed was started


_KILLABLE = textwrap.dedent("""
    import argparse, sys
    from meav_merge.data.synth.pipeline import add_cli
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers().add_parser("data").add_subparsers())
    args = parser.parse_args(sys.argv[1:])
    args.func(args)
""")


def test_resume_after_kill_keeps_every_record_exactly_once(tmp_path):
    personas = normal_personas(16)
    pfile = write_personas(tmp_path / "p.jsonl", personas)
    out = tmp_path / "out.jsonl"
    script = tmp_path / "run.py"
    script.write_text(_KILLABLE)
    with OpenAIStub(canned_answer, delay=0.05) as stub:
        argv = ["data", "synthesize", "--out", str(out), "--personas", str(pfile), "--base-url", stub.base_url,
                "--model", "m", "--concurrency", "2", "--seed", "5"]
        proc = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        first = out.read_bytes()
        first = first[:first.rfind(b"\n") + 1]
        n_first = first.count(b"\n")
        assert 3 <= n_first < 16
        with open(out, "ab") as f:  # as if killed in the middle of writing a line
            f.write(b'{"id": "medical-syn-0123456789ab", "domain": "medi')
        n_before = len(stub.requests)
        summary = synthesize(backend(stub), SynthesisConfig(personas_file=str(pfile), concurrency=2, seed=5),
                             out, progress=False)
        assert summary.repaired_tail
        assert summary.skipped_done == n_first and summary.written == 16 - n_first
        assert len(stub.requests) - n_before <= (16 - n_first + 2) * 4  # done records were not asked again
    final = out.read_bytes()
    assert final.startswith(first) and final.endswith(b"\n")
    ids = [r["id"] for r in lines_of(out)]  # every line parses
    assert sorted(ids) == sorted(record_id("medical", p, 5) for p in personas)
    assert len(load_records(out, domain="medical")) == 16


def test_output_that_cannot_be_resumed_is_refused(tmp_path):
    pfile = write_personas(tmp_path / "p.jsonl", normal_personas(2))
    cfg = SynthesisConfig(personas_file=str(pfile))
    dataset = tmp_path / "medical.jsonl"
    dataset.write_text((ROOT / "data" / "medical.jsonl").read_text().splitlines()[0] + "\n")
    with OpenAIStub(canned_answer) as stub:
        with pytest.raises(DataError, match=r"medical.jsonl:1: has a 'split' field"):
            synthesize(backend(stub), cfg, dataset, progress=False)
        corrupt = tmp_path / "corrupt.jsonl"
        corrupt.write_text('{"id": "a", "query": "q"}\nnot json\n{"id": "b", "query": "r"}\n')
        with pytest.raises(DataError, match=r"corrupt.jsonl:2: invalid JSON"):
            synthesize(backend(stub), cfg, corrupt, progress=False)
        assert synthesize(backend(stub), cfg, corrupt, force=True, progress=False).written == 2
        assert len(stub.requests) == 8


# --- inputs and settings ---------------------------------------------------------------------------
def test_persona_file_formats_and_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"persona": "A  nurse\\nin Leeds."}\n\n{"input persona": "A farmer.", "x": 1}\n')
    assert [p.text for p in read_personas(good)] == ["A nurse in Leeds.", "A farmer."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"persona": "ok"}\n{"persona": \n')
    with pytest.raises(SynthesisError, match=r"bad.jsonl:2: invalid JSON"):
        read_personas(bad)
    bad.write_text('{"persona": "ok"}\n{"name": "x"}\n')
    with pytest.raises(SynthesisError, match=r"bad.jsonl:2: needs a non-empty string field 'persona'"):
        read_personas(bad)


def test_config_and_cli_validation(tmp_path):
    with pytest.raises(SynthesisError, match="'safety' has levels safe/unsafe"):
        SynthesisConfig(domain="safety", create_persona=True)
    with pytest.raises(SynthesisError, match="no personas"):
        SynthesisConfig()
    with pytest.raises(SynthesisError, match="max_words"):
        SynthesisConfig(create_persona=True, min_words=50, max_words=20)
    with pytest.raises(SynthesisError, match="needs --base-url and --model"):
        run_cli(["data", "synthesize", "--out", str(tmp_path / "o.jsonl"), "--create-persona"])
    assert not (tmp_path / "o.jsonl").exists()


def test_cleanup_heuristics_keep_every_shipped_text_and_catch_bad_ones():
    texts = [t for d in ("medical", "financial", "legal") for r in read_jsonl(ROOT / "data" / f"{d}.jsonl")
             for t in (r.query, *r.responses.values())]
    assert len(texts) > 100
    assert [t[:80] for t in texts if not looks_english(t) or looks_cut_off(t)] == []
    for foreign in ["En general, es importante que hables con un profesional calificado sobre tu caso.",
                    "Im Allgemeinen sollten Sie mit Ihrem Arzt über Ihre Werte sprechen, bevor Sie etwas ändern.",
                    "En général, il est préférable de consulter un médecin pour votre situation particulière.",
                    "In het algemeen is het verstandig om met uw huisarts te praten over uw bloeddruk.",
                    "一般来说，您应该咨询医生，了解您的具体情况。"]:
        assert not looks_english(foreign), foreign
    assert looks_cut_off("Your reading is high, and the first thing to do is")
    assert looks_cut_off("Consider these options:")
    assert not looks_cut_off("Options:\n- cut alcohol\n- walk 30 minutes a day")
    assert drop_reason(ChatResult("A complete sentence that is fine.", "length")) == "truncated"
    assert drop_reason(ChatResult("  \n", "stop")) == "empty"
    assert drop_reason(ChatResult("Please consult a doctor about it.", "stop")) is None


def test_answer_parsing_tolerates_fences_labels_and_quotes():
    text = 'Sure!\n```json\n[{"persona": "A  nurse.", "topic": "pay"}, "A farmer.", {"x": 1}, 7]\n```\nThanks'
    assert parse_persona_list(text) == [("A nurse.", "pay"), ("A farmer.", "")]
    assert parse_persona_list("no list here") == [] and parse_persona_list("[broken") == []
    assert clean_reply('Query: "I am 40 and worried."') == "I am 40 and worried."
    assert clean_reply('**Reply:** Take it "as needed" only.') == 'Take it "as needed" only.'
    assert clean_reply('"One" and "two".') == '"One" and "two".'


# --- the local backend -------------------------------------------------------------------------------
def test_transformers_backend_with_tiny_model(tmp_path, tiny_tokenizer):
    import torch
    from tiny import build_model, build_tokenizer, save

    client = TransformersBackend(str(save(build_model(tiny_tokenizer, seed=0), tiny_tokenizer, tmp_path / "m")))
    msgs = [{"role": "user", "content": "I have a question about my blood pressure."}]
    a = client.complete(msgs, max_tokens=6, temperature=1.0, seed=11)
    assert a == client.complete(msgs, max_tokens=6, temperature=1.0, seed=11)
    assert a.text != client.complete(msgs, max_tokens=6, temperature=1.0, seed=12).text
    assert a.finish_reason == "length"
    greedy = client.complete(msgs, max_tokens=6, temperature=0)
    assert greedy == client.complete(msgs, max_tokens=6, temperature=0, seed=99)  # greedy ignores the seed

    # A model whose every logit is equal emits token 0 first; made the end-of-sequence
    # token, generation stops at once: "stop", not "length", and no text.
    tok = build_tokenizer()
    tok.eos_token = "<|endoftext|>"
    model = build_model(tok, seed=0, tie=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    stopper = TransformersBackend(str(save(model, tok, tmp_path / "stopper")))
    assert stopper.complete(msgs, max_tokens=6, temperature=0) == ChatResult("", "stop")

    with pytest.raises(ValueError, match="no \\*.safetensors"):
        TransformersBackend(str(tmp_path))


@pytest.mark.integration
def test_transformers_backend_with_embedded_model(embedded_model):
    client = TransformersBackend(str(embedded_model))
    result = client.complete([{"role": "user", "content": "In one sentence: why drink water?"}], max_tokens=24,
                             temperature=0)
    assert result.finish_reason in ("stop", "length") and result.text
    assert looks_english(result.text)
