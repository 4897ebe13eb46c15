"""Bad input and interrupted runs, through the real CLIs (issue 15): one test per class of hole.

Each test here failed on the code the issue was filed against: a NaN λ merged with exit 0,
`transfer: "false"` turned the fingerprint check off, `data split --write` dropped fields,
a misspelled lm-eval domain scored the default level, `--force` deleted inputs, messages
blamed the wrong thing, and the lm-eval task loaded the model before reading its options.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from meav_merge.cli.main import main

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*argv):
    """Run `meav ARGV` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def one_line_error(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().split("\n") if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def vector(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "vec"
    rc, _, err = cli("extract", "--aligned", tiny_dirs["aligned_a"], "--base", tiny_dirs["base"], "--out", out)
    assert rc == 0, err
    return out


def recipe(tmp_path: Path, base, entries, name="r.yaml") -> Path:
    body = {"merge_method": "meav", "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(p), "parameters": params} for p, params in entries]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def no_leftovers(parent: Path):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- 1. non-finite coefficients ----------------------------------------------------------
@pytest.mark.parametrize("lam", [float("nan"), float("inf"), [0.5, float("nan")]])
def test_nonfinite_lambda_is_refused_by_meav_merge(tiny_dirs, vector, tmp_path, lam):
    r = recipe(tmp_path, tiny_dirs["base"], [(vector, {"lambda": lam})])
    assert ".nan" in r.read_text() or ".inf" in r.read_text()
    rc, _, err = cli("merge", r, tmp_path / "out")
    assert rc == 2
    one_line_error(err, "`lambda`", "finite", "models[0]")
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_nonfinite_lambda_is_refused_by_plain_mergekit_yaml(tiny_dirs, vector, tmp_path):
    r = recipe(tmp_path, tiny_dirs["base"], [(vector, {"lambda": float("nan")})])
    proc = subprocess.run([str(BIN / "mergekit-yaml"), str(r), str(tmp_path / "out")], capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode != 0
    assert "`lambda`: must be a finite number, not nan" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("argv, needle", [
    (["sweep", "--vector", "v=v", "--data", "d", "--out", "o", "--lambdas", "nan,1"], "argument --lambdas"),
    (["sweep", "--vector", "v=v", "--data", "d", "--out", "o", "--lambdas", "0:inf:1"], "argument --lambdas: stop"),
    (["sweep", "--vector", "v=v", "--data", "d", "--out", "o", "--lambdas", "0:1e9:1e-9"], "10000 points"),
    (["awot", "generate", "--model", "m", "--prompt", "p", "--alpha", "nan"], "argument --alpha"),
    (["awot", "generate", "--model", "m", "--prompt", "p", "--penalty", "-inf"], "argument --penalty"),
    (["awot", "generate", "--model", "m", "--prompt", "p", "--steps", "1e3"], "argument --steps"),
    (["search", "--vector", "medical=v", "--out", "o", "--high", "inf"], "argument --high"),
    (["judge", "--domain", "medical", "--out", "o", "--vector", "v=v", "--lambda", "v=nan"], "argument --lambda"),
])
def test_nonfinite_command_line_numbers_fail_naming_the_option(argv, needle, tmp_path):
    # model folders are checked while the command line is read too: give an existing one
    argv = [str(tmp_path) if i and argv[i - 1] == "--model" else a for i, a in enumerate(argv)]
    rc, _, err = cli(*argv)
    assert rc == 2
    one_line_error(err, needle)


# --- 2. loose typing ---------------------------------------------------------------------
@pytest.mark.parametrize("params, needle", [
    ({"lambda": 1.0, "transfer": "false"}, "`transfer`: must be true or false (unquoted), not the string 'false'"),
    ({"lambda": True}, "`lambda`: must be a number, not True"),
    ({"lambda": "abc"}, "`lambda`: must be a number, not the string 'abc'"),
    ({"lambda": "0.5"}, "`lambda`: must be a number, not the string '0.5'"),
])
def test_loosely_typed_parameters_fail_naming_entry_and_key(tiny_dirs, tmp_path, params, needle):
    # a full checkpoint from another model: with transfer read as true it would merge silently
    params = {**params, "unaligned": str(tiny_dirs["other"])}
    r = recipe(tmp_path, tiny_dirs["base"], [(tiny_dirs["aligned_a"], params)])
    rc, _, err = cli("merge", r, tmp_path / "out")
    assert rc == 2
    one_line_error(err, needle, f"models[0] ({tiny_dirs['aligned_a']})")
    assert not (tmp_path / "out").exists()


# --- 3. rewriting user files -------------------------------------------------------------
def _records(n=6):
    rows = []
    for i in range(n):
        w = [f"w{i}x{j}" for j in range(12)]
        rows.append({"id": f"r{i}", "domain": "medical", "persona": f"p{i}\u2028second line",
                     "query": f"q{i} what about \u2029 this\u0085 and \x1c that?",
                     "expert": " ".join(w[:4]) + " \u2028 exact", "generic": " ".join(w[4:11]),
                     "avoidance": " ".join(w[11:]) + " sorry", "notes": {"by": "ann", "n": i}, "source": "manual"})
    return rows


def test_data_split_write_keeps_every_field_and_character(tmp_path):
    path = tmp_path / "medical.jsonl"
    rows = _records()
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    rc, out, err = cli("data", "split", path, "--write")
    assert rc == 0, err
    back = [json.loads(ln) for ln in path.read_bytes().decode("utf-8").split("\n") if ln]
    assert len(back) == len(rows)
    for before, after in zip(rows, back):
        assert after.pop("split") in ("train", "validation", "test")
        assert after == before and list(after) == list(before)
    rc, out, err = cli("data", "split", path)  # the tool reads its own output
    assert rc == 0, err


def test_valid_jsonl_with_unicode_line_separators_is_read(tmp_path):
    path = tmp_path / "medical.jsonl"
    rows = _records()
    for r in rows:
        r["split"] = "train"
    # U+2028, U+0085 and \x1c raw inside strings, a CRLF line end and a BOM: all valid JSON Lines
    text = "\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + ("\r\n" if i == 2 else "\n")
                              for i, r in enumerate(rows))
    path.write_bytes(text.encode("utf-8"))
    from meav_merge.data.schema import read_jsonl

    assert [r.id for r in read_jsonl(path)] == [r["id"] for r in rows]
    rc, out, err = cli("data", "validate", path)
    assert "invalid JSON" not in err and f"{len(rows)} records" in out


# --- 4 and 7. lm-eval task metadata ------------------------------------------------------
def test_lm_eval_misspelled_domain_fails_before_the_model_loads(tmp_path):
    # the model path does not exist: had the model been loaded first, that would be the error
    proc = subprocess.run([str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={tmp_path}/none",
                           "--tasks", "meav_pref_medical", "--device", "cpu",
                           "--metadata", json.dumps({"target": {"medicall": "avoidance"}})],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().split("\n")[-1]
    assert "unknown domain 'medicall'" in last and "medical, financial, legal" in last, proc.stderr[-2000:]
    assert "Initializing hf model" not in proc.stderr


def test_lm_eval_unknown_key_lists_the_valid_ones():
    from lm_eval import simple_evaluate

    with pytest.raises(ValueError, match=r"unknown --metadata key 'targte' \(did you mean 'target'\? valid keys: "
                                         r"add_bos_token, data_file, split, system_prompt, target, tokenizer\)"):
        simple_evaluate(model="hf", model_args="pretrained=/nonexistent", tasks=["meav_pref"],
                        metadata={"targte": "avoidance"})
    with pytest.raises(ValueError, match="split: 'tset' is not one of"):
        simple_evaluate(model="hf", model_args="pretrained=/nonexistent", tasks=["meav_pref_legal"],
                        metadata={"split": "tset"})


# --- 5. outputs and --force --------------------------------------------------------------
def test_force_refuses_cwd_empty_and_input_holding_outputs(tiny_dirs, vector, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_dirs["base"], work / "base")
    shutil.copytree(vector, work / "vec")
    r = recipe(work, work / "base", [(work / "vec", {"lambda": 0.5})])
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    monkeypatch.chdir(work)
    for out, needle in ((".", "current directory"), ("", "output path is empty"),
                        (str(work), "current directory"), (str(work / "vec"), "holds the input")):
        started = time.time()
        rc, _, err = cli("merge", r, out, "--force")
        assert rc == 2, (out, err)
        one_line_error(err, needle)
        assert time.time() - started < 5  # refused up front, not after a merge
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("merge", r, work, "--force")
    one_line_error(err, "holds the input")
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before and not no_leftovers(tmp_path)


def test_merge_output_card_modes_and_stale_temp_dirs(tiny_dirs, vector, tmp_path):
    r = recipe(tmp_path, tiny_dirs["base"], [(vector, {"lambda": 0.5})])
    out = tmp_path / "good"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from meav_merge.io.checkpoint import _HOST

    stale = tmp_path / f".good.tmp-{dead.pid}-{_HOST}-abc123"  # what a SIGKILLed run leaves
    (stale / "sub").mkdir(parents=True)
    rc, _, err = cli("merge", r, out)
    assert rc == 0, err
    assert not stale.exists() and not no_leftovers(tmp_path)
    assert "\n# good\n" in (out / "README.md").read_text()
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~mask for p in out.iterdir() if p.is_file())
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())


def test_sigterm_removes_the_temp_dir(tiny_dirs, vector, tmp_path):
    r = recipe(tmp_path, tiny_dirs["base"], [(vector, {"lambda": 0.5})])
    for _ in range(3):  # the tiny merge is quick: retry if it finished before the signal landed
        out = tmp_path / "out"
        proc = subprocess.Popen([str(BIN / "meav"), "merge", str(r), str(out)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not no_leftovers(tmp_path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        if rc != 0:
            break
        import shutil

        shutil.rmtree(out)
    assert rc == 128 + signal.SIGTERM, proc.stderr.read()
    assert not no_leftovers(tmp_path) and not out.exists()


def test_extract_into_existing_out_fails_before_reading(tiny_dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "out").mkdir()
    rc, _, err = cli("extract", "--aligned", broken, "--base", tiny_dirs["base"], "--out", tmp_path / "out")
    assert rc == 2
    one_line_error(err, "already exists")


# --- 6. messages that name the right problem ---------------------------------------------
def test_missing_entry_says_no_such_directory(tiny_dirs, tmp_path):
    r = recipe(tmp_path, tiny_dirs["base"], [(tmp_path / "typo", {"lambda": 1.0})])
    rc, _, err = cli("merge", r, tmp_path / "out")
    line = one_line_error(err, "no such directory")
    assert "meav_vector.json" not in line


def test_vector_missing_a_listed_tensor_fails_before_planning(tiny_dirs, vector, tmp_path):
    import shutil

    broken = tmp_path / "vec"
    shutil.copytree(vector, broken)
    meta = json.loads((broken / "meav_vector.json").read_text())
    name = sorted(meta["tensors"])[0]
    from safetensors.torch import save_file

    tensors = load_file(str(broken / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(broken / "model.safetensors"))
    r = recipe(tmp_path, tiny_dirs["base"], [(broken, {"lambda": 1.0})])
    rc, _, err = cli("merge", r, tmp_path / "out")
    one_line_error(err, f"lists tensor {name}", "files lack")
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_pickle_only_model_is_refused_with_conversion_advice(tiny_dirs, tmp_path):
    import shutil

    pick = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["aligned_a"], pick)
    sd = load_file(str(pick / "model.safetensors"))
    (pick / "model.safetensors").unlink()
    torch.save(sd, pick / "pytorch_model.bin")
    body = {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(tiny_dirs["base"]), "parameters": {"weight": 0.5}},
                       {"model": str(pick), "parameters": {"weight": 0.5}}]}
    (tmp_path / "lin.yaml").write_text(yaml.safe_dump(body))
    rc, _, err = cli("merge", tmp_path / "lin.yaml", tmp_path / "out")
    assert rc == 2
    one_line_error(err, "pytorch_model.bin", "only safetensors are read", "save_pretrained")


@pytest.mark.parametrize("swallow", ["converted", "swallowed"])
def test_sigterm_inside_an_extension_still_exits_as_terminated(tmp_path, swallow):
    # torch turned our SystemExit into "could not determine the shape of object type ..." once,
    # and the merge exited 2 as if the recipe were bad (seen in a fresh-clone run of this file)
    from meav_merge.io.checkpoint import atomic_output_dir

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        with atomic_output_dir(out) as tmp:
            (tmp / "part").write_text("x")
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises during this call
            except SystemExit:
                if swallow == "converted":
                    raise ValueError("could not determine the shape of object type 'UntypedStorage'")
    assert e.value.code == 128 + signal.SIGTERM
    assert not out.exists() and list(tmp_path.iterdir()) == []
