"""Vectors store only the tensors that changed; plain `mergekit-yaml` reads an absent tensor as zero."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meav_merge.vectors.alignment_vector import AlignmentVector, apply_vectors, extract_vector
from test_merge_method import run_mergekit, weights

TOP = "model.layers.1."


def top_layer_vector(base, root):
    """The sparse vector of a copy of ``base`` with only its top layer changed."""
    return extract_vector(_perturb_top(base, root / "aligned_top"), base, root / "vec").path


def _perturb_top(base, aligned):
    shutil.copytree(base, aligned)
    sd = load_file(str(aligned / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for n in sd:
        if n.startswith(TOP):
            sd[n] = sd[n] + 0.02 * torch.randn(sd[n].shape, generator=g)
    save_file(sd, str(aligned / "model.safetensors"), metadata={"format": "pt"})
    return aligned


@pytest.fixture(scope="module")
def top_only(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    vec = top_layer_vector(tiny_dirs["base"], root)
    return root / "aligned_top", vec


def test_extract_stores_only_changed_tensors(tiny_dirs, top_only):
    aligned, vdir = top_only
    stored = load_file(str(vdir / "model.safetensors"))
    base, al = weights(tiny_dirs["base"]), weights(aligned)
    assert stored and all(n.startswith(TOP) for n in stored)
    assert set(stored) == {n for n in base if not torch.equal(base[n], al[n])}
    meta = json.loads((vdir / "meav_vector.json").read_text())
    assert meta["storage"] == "sparse" and meta["format_version"] == 2
    assert meta["unchanged_tensors"] == len(base) - len(stored)
    vec = AlignmentVector.load(vdir)
    assert "model.embed_tokens.weight" not in vec and vec.keys() == sorted(stored)


def test_plain_mergekit_reads_absent_tensors_as_zero(tiny_dirs, top_only, tmp_path):
    aligned, vdir = top_only
    out = tmp_path / "merged"
    run_mergekit({"merge_method": "meav", "base_model": str(tiny_dirs["base"]), "dtype": "float32",
                  "models": [{"model": str(vdir), "parameters": {"lambda": -0.7}}]}, out, tmp_path)
    base, al, got = weights(tiny_dirs["base"]), weights(aligned), weights(out)
    for n, t in base.items():
        assert torch.allclose(got[n], t - 0.7 * (al[n] - t), atol=1e-6), n
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_sparse_and_full_vectors_merge_together(tiny_dirs, top_only, tmp_path):
    """An old full-size vector (format 1: every tensor stored) still loads and merges beside a sparse one."""
    aligned, vdir = top_only
    full = tmp_path / "full"
    shutil.copytree(vdir, full)
    base, al = weights(tiny_dirs["base"]), weights(aligned)
    save_file({n: al[n] - base[n] for n in base}, str(full / "model.safetensors"))
    meta = json.loads((full / "meav_vector.json").read_text())
    meta.update(format_version=1, storage=None)
    (full / "meav_vector.json").write_text(json.dumps(meta))
    assert len(AlignmentVector.load(full).keys()) == len(base)
    out = tmp_path / "merged2"
    run_mergekit({"merge_method": "meav", "base_model": str(tiny_dirs["base"]), "dtype": "float32",
                  "models": [{"model": str(vdir), "parameters": {"lambda": 0.5}},
                             {"model": str(full), "parameters": {"lambda": 0.25}}]}, out, tmp_path)
    got = weights(out)
    for n, t in base.items():
        assert torch.allclose(got[n], t + 0.75 * (al[n] - t), atol=1e-6), n


def test_tensor_absent_from_base_is_still_an_error(tiny_dirs, top_only, tmp_path):
    _, vdir = top_only
    broken = tmp_path / "base_missing"
    shutil.copytree(tiny_dirs["base"], broken)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["model.layers.0.mlp.up_proj.weight"]  # not in the vector: only the base could supply it
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    proc = run_mergekit({"merge_method": "meav", "base_model": str(broken), "dtype": "float32",
                         "models": [{"model": str(vdir), "parameters": {"lambda": 1.0, "transfer": True}}]},
                        tmp_path / "out", tmp_path, check=False)
    assert proc.returncode != 0
    assert "model.layers.0.mlp.up_proj.weight" in proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_sparse_arithmetic_and_apply(tiny_dirs, top_only, tmp_path):
    from transformers import AutoModelForCausalLM

    aligned, vdir = top_only
    sparse = AlignmentVector.load(vdir)
    full = extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path / "a")
    both = sparse + full  # union of tensors; absent = zero
    assert set(both.keys()) == set(full.keys())
    n_top, n_low = TOP + "mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(both[n_top], sparse[n_top] + full[n_top])
    assert torch.equal(both[n_low], full[n_low])
    assert sparse.cosine(full) == pytest.approx(float(
        sum((sparse[n].double() * full[n].double()).sum() for n in sparse.keys())) / (sparse.norm() * full.norm()))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["base"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_vectors(model, [(sparse, 2.0)])
    after = model.state_dict()
    assert torch.equal(after[n_low], before[n_low])
    assert torch.allclose(after[n_top], before[n_top] + 2.0 * sparse[n_top], atol=1e-7)
