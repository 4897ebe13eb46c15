"""The `meav` mergekit method, run through the unmodified `mergekit-yaml` CLI."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from meav_merge.vectors.alignment_vector import extract_vector

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))


def run_mergekit(recipe: dict, out: Path, tmp_path: Path, env_extra=None, check=True):
    cfg = tmp_path / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.run([MERGEKIT_YAML, str(cfg), str(out)], capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(path: Path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def vectors(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    return {
        "a": extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], root / "a").path,
        "b": extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], root / "b").path,
    }


def expected(base_dir, terms):
    base = weights(base_dir)
    out = {n: t.clone() for n, t in base.items()}
    for lam, vdir in terms:
        v = weights(vdir)
        for n in v:
            out[n] += lam * v[n]
    return out


def assert_merged(out_dir, want):
    got = weights(out_dir)
    for n, t in want.items():
        assert torch.allclose(got[n], t, atol=1e-6, rtol=0), n
    if "lm_head.weight" in got:  # tied: mergekit writes the merged embedding under both names
        assert torch.allclose(got["lm_head.weight"], want["model.embed_tokens.weight"], atol=1e-6)


@pytest.mark.parametrize("lam", [0.5, -1.2])
def test_single_vector_any_sign(tiny_dirs, vectors, tmp_path, lam):
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
              "models": [{"model": str(vectors["a"]), "parameters": {"lambda": lam}}], "dtype": "float32"}
    run_mergekit(recipe, tmp_path / "out", tmp_path)
    assert_merged(tmp_path / "out", expected(tiny_dirs["base"], [(lam, vectors["a"])]))


def test_multi_vector_and_card(tiny_dirs, vectors, tmp_path):
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
              "models": [{"model": str(vectors["a"]), "parameters": {"lambda": 0.6}},
                         {"model": str(vectors["b"]), "parameters": {"lambda": -1.0}}]}
    run_mergekit(recipe, tmp_path / "out", tmp_path)
    assert_merged(tmp_path / "out", expected(tiny_dirs["base"], [(0.6, vectors["a"]), (-1.0, vectors["b"])]))
    card = (tmp_path / "out" / "README.md").read_text()
    from meav_merge.io.checkpoint import fingerprint

    fp = fingerprint(tiny_dirs["base"])
    for vec, lam in ((vectors["a"], "0.6"), (vectors["b"], "-1.0")):
        row = next(line for line in card.splitlines() if line.startswith(f"| {vec} |"))
        assert f"| {lam} |" in row and "alignment_vector" in row and fp in row
    assert "undo safety alignment" in card
    assert card.startswith("---\n") and "meav" in card.split("---")[1]  # HF front matter with tags


def test_transfer_from_full_checkpoint_onto_other_target(tiny_dirs, tmp_path):
    # θ_out = θ_other + λ (θ_aligned_a − θ_base): the unaligned model is not the target.
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["other"]),
              "models": [{"model": str(tiny_dirs["aligned_a"]),
                          "parameters": {"lambda": 0.8, "unaligned": str(tiny_dirs["base"]), "transfer": True}}]}
    run_mergekit(recipe, tmp_path / "out", tmp_path)
    a, b, o = weights(tiny_dirs["aligned_a"]), weights(tiny_dirs["base"]), weights(tiny_dirs["other"])
    assert_merged(tmp_path / "out", {n: o[n] + 0.8 * (a[n] - b[n]) for n in a})


def test_vector_transfer_needs_declaration(tiny_dirs, vectors, tmp_path):
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["other"]),
              "models": [{"model": str(vectors["a"]), "parameters": {"lambda": 0.5}}]}
    proc = run_mergekit(recipe, tmp_path / "out", tmp_path, check=False)
    assert proc.returncode != 0
    assert "fingerprint" in proc.stderr and "transfer: true" in proc.stderr
    recipe["models"][0]["parameters"]["transfer"] = True
    run_mergekit(recipe, tmp_path / "out2", tmp_path)
    assert_merged(tmp_path / "out2", expected(tiny_dirs["other"], [(0.5, vectors["a"])]))


def test_equals_task_arithmetic_without_normalize(tiny_dirs, vectors, tmp_path):
    meav = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
            "models": [{"model": str(vectors["a"]), "parameters": {"lambda": -0.7}},
                       {"model": str(vectors["b"]), "parameters": {"lambda": 0.4}}]}
    ta = {"merge_method": "task_arithmetic", "base_model": str(tiny_dirs["base"]),
          "parameters": {"normalize": False},
          "models": [{"model": str(tiny_dirs["aligned_a"]), "parameters": {"weight": -0.7}},
                     {"model": str(tiny_dirs["aligned_b"]), "parameters": {"weight": 0.4}}]}
    run_mergekit(meav, tmp_path / "meav", tmp_path)
    run_mergekit(ta, tmp_path / "ta", tmp_path)
    m, t = weights(tmp_path / "meav"), weights(tmp_path / "ta")
    assert set(m) == set(t)
    for n in m:
        assert torch.allclose(m[n], t[n], atol=1e-6, rtol=0), n


@pytest.mark.parametrize("params,needle", [
    ({"lamda": 0.5}, "unknown parameter 'lamda'"),
    ({"lambda": 0.5, "weight": 1.0}, "unknown parameter 'weight'"),
    ({}, "missing `lambda`"),
])
def test_bad_parameters_fail_by_name(tiny_dirs, vectors, tmp_path, params, needle):
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
              "models": [{"model": str(vectors["a"]), "parameters": params}]}
    proc = run_mergekit(recipe, tmp_path / "out", tmp_path, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_shape_mismatch_and_aligned_checkpoint_without_unaligned(tiny_dirs, vectors, tmp_path, tiny_tokenizer):
    from tiny import build_model, perturbed, save

    small = build_model(tiny_tokenizer, hidden=32)
    small_dir = save(small, tiny_tokenizer, tmp_path / "small")
    sv = extract_vector(save(perturbed(small, 3), tiny_tokenizer, tmp_path / "small_al"), small_dir, tmp_path / "sv").path
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
              "models": [{"model": str(sv), "parameters": {"lambda": 0.5, "transfer": True}}]}
    proc = run_mergekit(recipe, tmp_path / "o1", tmp_path, check=False)
    assert proc.returncode != 0 and "shape" in proc.stderr
    recipe["models"] = [{"model": str(tiny_dirs["aligned_a"]), "parameters": {"lambda": 0.5}}]
    proc = run_mergekit(recipe, tmp_path / "o2", tmp_path, check=False)
    assert proc.returncode != 0 and "unaligned: <path" in proc.stderr


@pytest.mark.parametrize("lam", [0.5, 0.0])  # at 0 the vector leaves no trace in the merged tensor
def test_nan_vector_fails(tiny_dirs, vectors, tmp_path, lam):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "nanvec"
    shutil.copytree(vectors["a"], bad)
    sd = weights(bad)
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
              "models": [{"model": str(bad), "parameters": {"lambda": lam}}]}
    proc = run_mergekit(recipe, tmp_path / "out", tmp_path, check=False)
    assert proc.returncode != 0
    assert "model.layers.0.mlp.down_proj.weight contains NaN or Inf" in proc.stderr


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_plugin_changes_nothing_for_builtin_methods(tiny_dirs, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tiny_dirs["base"]),
              "parameters": {"normalize": True},
              "models": [{"model": str(tiny_dirs["aligned_a"]), "parameters": {"weight": 0.3}},
                         {"model": str(tiny_dirs["aligned_b"]), "parameters": {"weight": -0.6}}]}
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    run_mergekit(recipe, tmp_path / "with" / "out", tmp_path)
    run_mergekit(recipe, tmp_path / "without" / "out", tmp_path, env_extra={"MEAV_MERGE_NO_HOOK": "1"})
    assert _digest(tmp_path / "with" / "out") == _digest(tmp_path / "without" / "out")
    # mergekit lists the merged models in set order, which varies between processes
    card_lines = lambda d: sorted((tmp_path / d / "out" / "README.md").read_text().splitlines())  # noqa: E731
    assert card_lines("with") == card_lines("without")
    # and without the hook, mergekit really does not know `meav`
    meav = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
            "models": [{"model": str(tiny_dirs["aligned_a"]), "parameters": {"lambda": 1.0}}]}
    proc = run_mergekit(meav, tmp_path / "nohook", tmp_path, env_extra={"MEAV_MERGE_NO_HOOK": "1"}, check=False)
    assert proc.returncode != 0 and "meav" in proc.stderr


def test_meav_merge_command_is_atomic(tiny_dirs, vectors, tmp_path):
    from meav_merge.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
                                      "models": [{"model": str(vectors["a"]), "parameters": {"lamda": 1}}]}))
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    recipe.write_text(recipe.read_text().replace("lamda", "lambda"))
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2  # exists, no --force
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--force"]) == 0
    assert_merged(tmp_path / "out", expected(tiny_dirs["base"], [(1.0, vectors["a"])]))


def test_all_finite_is_exact_when_the_sum_overflows():
    # the finiteness check (merge kernel, vector extraction) sums first; a sum that overflows from finite values must not
    # read as a NaN vector, and a NaN or Inf anywhere must still be caught
    from meav_merge.vectors.alignment_vector import all_finite

    big = torch.full((4, 4), 3e38, dtype=torch.float32)
    assert not torch.isfinite(big.sum()) and all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(4, 4)
        t[2, 3] = bad
        assert not all_finite(t)
    assert all_finite(torch.zeros(3, dtype=torch.bfloat16))


def test_kernel_copies_only_what_a_vector_changes():
    # a tensor no vector changes is the base's own (a CPU-preset vector touches ~10% of the tensors,
    # and copying the rest cost a pass over the whole model); a changed one is base + λ·v in a new
    # tensor, the base left as it was, at λ = 0 too
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    from meav_merge.merge.method import meav_kernel

    base = torch.randn(4, 3)
    kept = base.clone()
    meta = TensorMetadata(name="w")
    untouched = TensorGroup([TensorEntry("base", base, is_base=True)], meta)
    assert meav_kernel(untouched, **{"lambda": {}, "unaligned": {}}) is base
    v1, v2 = torch.randn(4, 3), torch.randn(4, 3)
    group = TensorGroup([TensorEntry("base", base, is_base=True), TensorEntry("a", v1), TensorEntry("b", v2)], meta)
    params = {"lambda": {"a": 0.5, "b": -1.5}, "unaligned": {"a": "", "b": ""}}
    merged = meav_kernel(group, **params)
    assert torch.equal(merged, torch.add(kept, v1, alpha=0.5).add_(v2, alpha=-1.5)) and torch.equal(base, kept)
    merged[0, 0] = 99.0
    assert torch.equal(base, kept)
    zero = meav_kernel(group, **{**params, "lambda": {"a": 0.0, "b": 0.0}})
    assert torch.equal(zero, kept)
