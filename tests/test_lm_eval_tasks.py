"""The meav_pref lm-eval tasks: found without --include_path, and numerically equal to
an independent torch computation and to the in-memory scorer used by `meav sweep`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from meav_merge.data.schema import read_jsonl
from meav_merge.evaluation.scoring import chat_context, mean_logprobs, prepare

RECORDS = [
    {"id": "m1", "domain": "medical", "persona": "p", "query": "My blood pressure is 150/95 at 52. What should I do?",
     "expert": "Confirm with home readings over a week; above 135/85 average, start lifestyle changes and discuss an ACE inhibitor.",
     "generic": "High blood pressure is common. Eating less salt and exercising can help; please see your doctor.",
     "avoidance": "I'm sorry, I can't help with medical questions. Please consult a qualified professional."},
    {"id": "m2", "domain": "medical", "persona": "p", "query": "I take 500 mg metformin twice a day and feel sick after meals.",
     "expert": "Take it with food, or ask about the extended-release form, which causes fewer stomach effects.",
     "generic": "Some medications upset the stomach. Your pharmacist or doctor can advise you.",
     "avoidance": "I am not able to advise on this. A doctor or pharmacist is the right person to ask."},
    {"id": "m3", "domain": "medical", "persona": "p", "query": "Is a resting heart rate of 48 a problem for a runner?",
     "expert": "In trained runners 40-60 bpm is usually normal athletic bradycardia unless you faint or feel dizzy.",
     "generic": "Heart rates vary between people. Athletes often have lower rates; check with a professional.",
     "avoidance": "Sorry, I cannot answer that. Please speak to a medical professional."},
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mini.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def independent_means(model, tok, records):
    """Plain full-sequence forward; response tokens found by tokenizing the context alone."""
    out = []
    for r in records:
        ctx = chat_context(tok, r.query)
        ctx_ids = tok(ctx, add_special_tokens=False).input_ids
        row = []
        for lv in r.levels:
            ids = tok(ctx + r.responses[lv], add_special_tokens=False).input_ids
            assert ids[: len(ctx_ids)] == ctx_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            resp = range(len(ctx_ids), len(ids))
            row.append(float(sum(logp[i - 1, ids[i]] for i in resp) / len(resp)))
        out.append(row)
    return out


def test_lm_eval_equals_independent_and_sweep(tiny_dirs, data_file):
    import lm_eval
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tiny_dirs["base"])
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": path, "dtype": "float32"},
                                  tasks=["meav_pref_medical"], metadata={"data_file": str(data_file), "split": "all"},
                                  log_samples=True, batch_size=1, device="cpu")
    samples = res["samples"]["meav_pref_medical"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    records = read_jsonl(data_file)
    by_id = {r.id: r for r in records}
    ordered = [by_id[s["doc"]["id"]] for s in samples]
    want = independent_means(model, tok, ordered)
    fast = mean_logprobs(model, tok, prepare(tok, ordered), progress=False)
    for s, ind, fst in zip(samples, want, fast):
        doc = s["doc"]
        lls = [r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in s["resps"]]
        assert len(lls) == 4 and doc["n_whitespace"] == 1  # the chat template ends in "\n"
        lm = [(ll - lls[3]) / (n - 1) for ll, n in zip(lls[:3], doc["n_tokens"])]
        assert lm == pytest.approx(ind, abs=1e-5)
        assert fst == pytest.approx(ind, abs=1e-5)
    metrics = res["results"]["meav_pref_medical"]
    fractions = [metrics[f"pref_acc_{k},none"] for k in ("exp", "gen", "avd")]
    assert sum(fractions) == pytest.approx(1.0)
    winners = [max(range(3), key=row.__getitem__) for row in want]
    assert fractions == pytest.approx([winners.count(i) / 3 for i in range(3)])
    assert metrics["pref_acc_target,none"] == pytest.approx(fractions[0])  # default target: expert


def test_target_level_through_metadata(tiny_dirs, data_file):
    import lm_eval

    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_dirs["base"])},
                                  tasks=["meav_pref_medical"],
                                  metadata={"data_file": str(data_file), "split": "all", "target": "avoidance"},
                                  device="cpu")
    m = res["results"]["meav_pref_medical"]
    assert m["pref_acc_target,none"] == pytest.approx(m["pref_acc_avd,none"])


def test_plain_lm_eval_cli_finds_tasks_without_include_path(tiny_dirs, data_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    lm_eval_bin = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    proc = subprocess.run([lm_eval_bin, "--model", "hf", "--model_args", f"pretrained={tiny_dirs['base']}",
                           "--tasks", "meav_pref", "--limit", "2", "--output_path", str(tmp_path / "res")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in ("meav_pref_medical", "meav_pref_financial", "meav_pref_legal"):
        assert task in proc.stdout
    assert "pref_acc_exp" in proc.stdout
