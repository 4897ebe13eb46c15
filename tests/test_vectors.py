import json

import pytest
import torch
from safetensors.torch import load_file

from meav_merge.io.checkpoint import Checkpoint, CheckpointError, fingerprint
from meav_merge.vectors.alignment_vector import AlignmentVector, VectorError, apply_vectors, extract_vector


def _sd(path):
    return load_file(str(path / "model.safetensors"))


def test_extract_is_exact_difference_with_provenance(tiny_dirs, tmp_path):
    out = tmp_path / "vec"
    vec = extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], out, meta={"domain": "medical"})
    a, b, v = _sd(tiny_dirs["aligned_a"]), _sd(tiny_dirs["base"]), _sd(out)
    assert set(v) == set(a)
    for n in a:
        assert torch.equal(v[n], a[n] - b[n])
        assert v[n].dtype == torch.float32
    meta = json.loads((out / "meav_vector.json").read_text())
    assert meta["domain"] == "medical"
    assert meta["kind"] == "alignment_vector"
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["base_fingerprint"] == fingerprint(tiny_dirs["base"])
    assert meta["tensors"]["model.norm.weight"] == [64]
    assert (out / "config.json").is_file()
    assert vec.keys() == sorted(a)


def test_preference_vector_is_plus_minus_minus(tiny_dirs, tmp_path):
    out = tmp_path / "pv"
    extract_vector(tiny_dirs["aligned_a"], out=out, minus=tiny_dirs["aligned_b"])
    a, b, v = _sd(tiny_dirs["aligned_a"]), _sd(tiny_dirs["aligned_b"]), _sd(out)
    for n in a:
        assert torch.equal(v[n], a[n] - b[n])
    assert json.loads((out / "meav_vector.json").read_text())["kind"] == "preference_vector"


def test_fingerprint_separates_models_and_matches_copies(tiny_dirs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dirs["base"], copy)
    assert fingerprint(copy) == fingerprint(tiny_dirs["base"])
    assert fingerprint(tiny_dirs["aligned_a"]) != fingerprint(tiny_dirs["base"])
    # kept per process, but not past a rewrite of the same folder's weights
    shutil.copy(tiny_dirs["aligned_a"] / "model.safetensors", copy / "model.safetensors")
    assert fingerprint(copy) == fingerprint(tiny_dirs["aligned_a"])


def test_vector_arithmetic_norms_and_cosine(tiny_dirs, tmp_path):
    va = extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path / "a")
    vb = extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], tmp_path / "b")
    n = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose((va + vb)[n], va[n] + vb[n])
    assert torch.allclose((-va)[n], -va[n])
    assert torch.allclose((0.5 * va)[n], 0.5 * va[n])
    assert torch.allclose((va - vb)[n], va[n] - vb[n])
    assert va.cosine(va) == pytest.approx(1.0)
    assert va.cosine(-va) == pytest.approx(-1.0)
    assert abs(va.cosine(vb)) < 0.1  # independent random perturbations are near-orthogonal
    norms = va.norms()
    assert norms[n] == pytest.approx(float(va[n].double().norm()))
    layers = va.layer_norms()
    assert set(layers) == {"layer.000", "layer.001", "other"}
    total = sum(x * x for x in layers.values()) ** 0.5
    assert total == pytest.approx(va.norm(), rel=1e-9)


def test_sum_of_vectors_and_provenance_through_algebra(tiny_dirs, tmp_path):
    va = extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path / "a", meta={"domain": "medical"})
    vb = extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], tmp_path / "b", meta={"domain": "legal"})
    n = "model.layers.1.mlp.up_proj.weight"
    total = sum([va, 2.0 * vb])  # starts from 0 + va: needs __radd__
    assert torch.allclose(total[n], va[n] + 2.0 * vb[n])
    # what both operands are for still holds, so the sum is checked against a target like them
    assert total.meta["base_fingerprint"] == va.meta["base_fingerprint"] == fingerprint(tiny_dirs["base"])
    derived = total.meta["derived"]
    assert derived["op"] == "add"
    first, second = derived["operands"]
    assert first["domain"] == "medical" and first["path"] == str(tmp_path / "a")
    assert second["domain"] == "legal" and second["scaled_by"] == 2.0
    assert "domain" not in total.meta  # a sum of two domains' vectors is neither domain
    diff = va - vb
    assert diff.meta["derived"]["op"] == "sub" and torch.allclose(diff[n], va[n] - vb[n])
    saved = total.save(tmp_path / "sum", base_config_dir=tiny_dirs["base"])
    assert AlignmentVector.load(saved).meta["derived"] == derived  # provenance survives a round trip


def test_apply_vectors_in_memory(tiny_dirs, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    va = extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["base"]))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_vectors(model, [(va, -0.7)])
    n = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(model.state_dict()[n], base[n] - 0.7 * va[n], atol=1e-7)
    # re-weighting from a stored base does not accumulate
    apply_vectors(model, [(va, 0.3)], base_state=base)
    assert torch.allclose(model.state_dict()[n], base[n] + 0.3 * va[n], atol=1e-7)


def test_extract_refuses_overwrite_and_mismatch(tiny_dirs, tmp_path, tiny_tokenizer):
    from tiny import build_model, save

    out = tmp_path / "vec"
    extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], out)
    assert (out / "model.safetensors").read_bytes() == before
    extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], out, force=True)
    assert (out / "model.safetensors").read_bytes() != before
    small = save(build_model(tiny_tokenizer, hidden=32), tiny_tokenizer, tmp_path / "small")
    with pytest.raises(VectorError, match="shape"):
        extract_vector(small, tiny_dirs["base"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_only_safetensors_are_read(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="only safetensors"):
        Checkpoint(d)


def test_nan_in_checkpoint_is_refused(tiny_dirs, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny_dirs["aligned_a"], bad)
    sd = _sd(bad)
    sd["model.norm.weight"][3] = float("nan")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VectorError, match="model.norm.weight.*NaN"):
        extract_vector(bad, tiny_dirs["base"], tmp_path / "v")


def test_lazy_load_round_trip(tiny_dirs, tmp_path):
    extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path / "a")
    v = AlignmentVector.load(tmp_path / "a")
    assert v._tensors == {}  # nothing read until asked
    t = v["model.norm.weight"]
    assert list(v._tensors) == ["model.norm.weight"]
    assert t.shape == (64,)
