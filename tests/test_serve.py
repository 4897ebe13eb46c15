"""`meav serve` on loopback, driven by the real `openai` client and real `lm_eval`."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from meav_merge.vectors.alignment_vector import AlignmentVector, apply_vectors, extract_vector
from test_merge_method import run_mergekit

MEAV = str(Path(sys.executable).with_name("meav"))
PROMPTS = ["I have a question about my blood pressure medication.",
           "The landlord kept my security deposit after I moved out."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log: Path):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([MEAV, "serve", "--port", str(port), *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    from test_sparse_vectors import top_layer_vector

    root = tmp_path_factory.mktemp("serve")
    vecs = {"medical": top_layer_vector(tiny_dirs["base"], root),
            "legal": extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], root / "legal").path}
    recipe = root / "insurance.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "meav", "base_model": str(tiny_dirs["base"]), "dtype": "float32",
        "models": [{"model": str(vecs["medical"]), "parameters": {"lambda": -1.0}},
                   {"model": str(vecs["legal"]), "parameters": {"lambda": 0.6}}]}))
    proc, url = start_server(["--model", str(tiny_dirs["base"]), "--vector", f"medical={vecs['medical']}",
                              "--vector", f"legal={vecs['legal']}", "--recipe", f"insurance={recipe}"],
                             root / "server.log")
    yield {"url": url, "vecs": vecs, "recipe": recipe, "root": root, "proc": proc}
    proc.terminate()
    proc.wait(30)


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def reference_logprobs(model_dir, tokenizer, text, vectors=()):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    apply_vectors(model, [(AlignmentVector.load(p), lam) for p, lam in vectors])
    ids = tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


def served_logprobs(c, model, text, **extra):
    r = c.completions.create(model=model, prompt=text, max_tokens=1, echo=True, logprobs=1, temperature=0,
                             extra_body=extra or None)
    lp = r.choices[0].logprobs.token_logprobs
    assert lp[0] is None
    return lp[1:-1]  # the last is the generated token


def test_preset_equals_merged_checkpoint(tiny_dirs, tiny_tokenizer, setup, tmp_path):
    merged = tmp_path / "merged"
    run_mergekit(yaml.safe_load(setup["recipe"].read_text()), merged, tmp_path)
    c = client(setup["url"])
    for text in PROMPTS:
        want = reference_logprobs(merged, tiny_tokenizer, text)
        for model, extra in (("insurance", {}), ("base+medical=-1,legal=0.6", {}),
                             ("base", {"meav": {"medical": -1.0, "legal": 0.6}})):
            got = served_logprobs(c, model, text, **extra)
            assert got == pytest.approx(want, abs=1e-4), model
    base = served_logprobs(c, "base", PROMPTS[0])
    assert max(abs(a - b) for a, b in zip(base, reference_logprobs(merged, tiny_tokenizer, PROMPTS[0]))) > 1e-3
    ids = tiny_tokenizer(PROMPTS[0], add_special_tokens=False).input_ids  # token-id prompts, as lm-eval sends
    r = c.completions.create(model="insurance", prompt=[ids, ids[:5]], max_tokens=1, echo=True, logprobs=1,
                             temperature=0)
    assert r.choices[0].logprobs.token_logprobs[1:-1] == pytest.approx(
        reference_logprobs(merged, tiny_tokenizer, PROMPTS[0]), abs=1e-4)
    assert len(r.choices[1].logprobs.token_logprobs) == 6


def test_concurrent_clients_get_their_own_setting(tiny_tokenizer, tiny_dirs, setup):
    settings = {"base+medical=2": [(setup["vecs"]["medical"], 2.0)],
                "base+legal=-1.5": [(setup["vecs"]["legal"], -1.5)]}
    want = {m: reference_logprobs(tiny_dirs["base"], tiny_tokenizer, PROMPTS[1], v) for m, v in settings.items()}
    assert max(abs(a - b) for a, b in zip(*want.values())) > 1e-3
    errors, done = [], []

    def worker(model):
        c = client(setup["url"])
        for _ in range(12):
            got = served_logprobs(c, model, PROMPTS[1])
            if got != pytest.approx(want[model], abs=1e-4):
                errors.append(model)
            done.append(model)

    threads = [threading.Thread(target=worker, args=(m,)) for m in settings for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(done) == 48 and errors == []


def test_chat_and_models(setup):
    c = client(setup["url"])
    ids = {m.id for m in c.models.list().data}
    assert {"base", "insurance", "base+medical=1", "base+legal=1"} <= ids
    r = c.chat.completions.create(model="insurance", messages=[{"role": "user", "content": "hello"}],
                                  max_tokens=6, temperature=0)
    again = c.chat.completions.create(model="insurance", messages=[{"role": "user", "content": "hello"}],
                                      max_tokens=6, temperature=0)
    assert r.choices[0].message.content == again.choices[0].message.content
    assert r.usage.completion_tokens == 6


@pytest.mark.parametrize("model,extra,param", [
    ("base+dental=1", None, "model"),
    ("nonsense", None, "model"),
    ("base+medical=abc", None, "model"),
    ("base+medical=inf", None, "model"),
    ("base", {"meav": {"dental": 1}}, "meav.dental"),
    ("base", {"meav": {"medical": "1"}}, "meav.medical"),
    ("base", {"meav": {"medical": True}}, "meav.medical"),
    ("base", {"meav": {"medical": 10**400}}, "meav.medical"),  # a JSON integer past float's range
])
def test_bad_settings_are_4xx_naming_the_field(setup, model, extra, param):
    import openai

    with pytest.raises(openai.APIStatusError) as e:
        client(setup["url"]).completions.create(model=model, prompt="hi", max_tokens=1, extra_body=extra)
    assert 400 <= e.value.status_code < 500
    assert e.value.body["param"] == param and param.split(".")[0] in e.value.body["message"]


def _post(url, data: bytes):
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]
    raise AssertionError("request was accepted")


def test_malformed_bodies(setup):
    url = setup["url"]
    assert _post(url, b'{"model": "base", "prompt": ')[0] == 400
    code, err = _post(url, b'{"model": "base", "prompt": "hi", "meav": {"medical": NaN}}')
    assert code == 400 and err["param"] == "meav.medical" and "finite" in err["message"]
    code, err = _post(url, json.dumps({"model": "base", "prompt": [1] * 1100, "max_tokens": 1}).encode())
    assert code == 400 and err["param"] == "prompt" and "context" in err["message"]
    code, err = _post(url, json.dumps({"model": "base", "prompt": "hi", "max_tokens": -1}).encode())
    assert code == 400 and err["param"] == "max_tokens"


def test_sigterm_finishes_in_flight_request_and_exits(tiny_dirs, setup, tmp_path):
    proc, url = start_server(["--model", str(tiny_dirs["base"]), "--vector", f"medical={setup['vecs']['medical']}"],
                             tmp_path / "log")
    result = {}

    def long_request():
        r = client(url).completions.create(model="base+medical=1", prompt="hello", max_tokens=200, temperature=0)
        result["tokens"] = r.usage.completion_tokens

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert proc.wait(60) in (0, -signal.SIGTERM)
    assert result.get("tokens", 0) > 0  # the in-flight request was answered
    assert "worker stopped" in (tmp_path / "log").read_text()


def _lm_eval(model, model_args, data_file, out: Path):
    lm_eval_bin = str(Path(sys.executable).with_name("lm_eval"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([lm_eval_bin, "--model", model, "--model_args", model_args, "--tasks", "meav_pref_medical",
                           "--metadata", json.dumps({"data_file": str(data_file), "split": "all"}),
                           "--output_path", str(out), "--log_samples"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res,) = out.rglob("results_*.json")
    m = json.loads(res.read_text())["results"]["meav_pref_medical"]
    (samples,) = out.rglob("samples_meav_pref_medical_*.jsonl")
    lls = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        lls[s["doc_id"]] = [float(r[0][0]) for r in s["resps"]]
    return [m[f"pref_acc_{k},none"] for k in ("exp", "gen", "avd")], [lls[k] for k in sorted(lls)]


def test_lm_eval_local_completions_equals_hf_on_merged(tiny_dirs, setup, tmp_path):
    from test_lm_eval_tasks import RECORDS

    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    merged = tmp_path / "merged"
    run_mergekit(yaml.safe_load(setup["recipe"].read_text()), merged, tmp_path)
    hf = _lm_eval("hf", f"pretrained={merged},dtype=float32", data, tmp_path / "hf")
    served = _lm_eval("local-completions", f"model=insurance,base_url={setup['url']}/v1/completions,"
                      f"tokenizer={tiny_dirs['base']},tokenizer_backend=huggingface,max_retries=1",
                      data, tmp_path / "served")
    assert served[0] == hf[0] and sum(hf[0]) == pytest.approx(1.0)
    for a, b in zip(served[1], hf[1]):  # every continuation's log-likelihood, not just the fractions
        assert a == pytest.approx(b, abs=1e-4)
    base = _lm_eval("local-completions", f"model=base,base_url={setup['url']}/v1/completions,"
                    f"tokenizer={tiny_dirs['base']},tokenizer_backend=huggingface,max_retries=1",
                    data, tmp_path / "base")
    assert max(abs(a - b) for x, y in zip(base[1], hf[1]) for a, b in zip(x, y)) > 1e-3
    print("meav_pref_medical fractions (exp, gen, avd): hf on merged", hf[0], "served insurance", served[0],
          "served base", base[0])
