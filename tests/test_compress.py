"""`meav compress`: truncated-SVD vectors that every reader accepts, and their PEFT LoRA export."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meav_merge.vectors.alignment_vector import AlignmentVector, VectorError, apply_vectors, extract_vector
from meav_merge.vectors.compress import compress_vector, vector_bytes
from meav_merge.vectors.peft_export import export_peft
from test_merge_method import run_mergekit, weights

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def vec_dir(tiny_dirs, tmp_path_factory):
    return extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path_factory.mktemp("c") / "v").path


def test_fixed_rank_is_truncated_svd(vec_dir, tmp_path):
    full = AlignmentVector.load(vec_dir)
    c = compress_vector(vec_dir, tmp_path / "r4", rank=4)
    assert set(c.keys()) == set(full.keys())  # every reader sees the same tensor names
    b, a = c.factors(Q)
    assert b.shape == (64, 4) and a.shape == (4, 64)
    u, s, vh = torch.linalg.svd(full[Q])
    best = (u[:, :4] * s[:4]) @ vh[:4]  # Eckart-Young: the best rank-4 approximation
    assert torch.allclose(c[Q], best, atol=1e-5)
    norm = "model.layers.0.input_layernorm.weight"
    assert c.factors(norm) is None and torch.equal(c[norm], full[norm])  # 1-D stays dense
    assert vector_bytes(tmp_path / "r4") < 0.3 * vector_bytes(vec_dir)
    assert c.meta["storage"] == "lowrank" and c.meta["lowrank"]["ranks"][Q] == 4


def test_energy_threshold_picks_rank_per_matrix(vec_dir, tmp_path):
    full = AlignmentVector.load(vec_dir)
    c = compress_vector(vec_dir, tmp_path / "e", energy=0.6)
    s = torch.linalg.svdvals(full[Q]).double().pow(2)
    cum = torch.cumsum(s, 0) / s.sum()
    r = c.meta["lowrank"]["ranks"][Q]
    assert cum[r - 1] >= 0.6 > cum[r - 2]
    # energy 1.0 gives factors at least as large as the matrix: kept dense, exact
    exact = compress_vector(vec_dir, tmp_path / "one", energy=1.0)
    assert torch.equal(exact[Q], full[Q])


@pytest.mark.parametrize("kw", [{"rank": 0}, {"energy": float("nan")}, {"energy": 1.5}, {"rank": 2, "energy": 0.5}, {}])
def test_bad_settings_are_refused(vec_dir, tmp_path, kw):
    with pytest.raises(VectorError, match="rank|energy"):
        compress_vector(vec_dir, tmp_path / "bad", **kw)
    assert not (tmp_path / "bad").exists()


def test_plain_mergekit_merges_a_compressed_vector(tiny_dirs, vec_dir, tmp_path):
    c = compress_vector(vec_dir, tmp_path / "r8", rank=8)
    out = tmp_path / "merged"
    run_mergekit({"merge_method": "meav", "base_model": str(tiny_dirs["base"]), "dtype": "float32",
                  "models": [{"model": str(c.path), "parameters": {"lambda": -0.8}}]}, out, tmp_path)
    base, got = weights(tiny_dirs["base"]), weights(out)
    b, a = c.factors(Q)
    assert torch.allclose(got[Q], base[Q] - 0.8 * (b @ a), atol=1e-6)
    assert not torch.allclose(got[Q], base[Q] - 0.8 * AlignmentVector.load(vec_dir)[Q], atol=1e-4)


def test_peft_adapter_equals_dense_low_rank_vector(tiny_dirs, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from test_sparse_vectors import top_layer_vector
    from transformers import AutoModelForCausalLM

    top = top_layer_vector(tiny_dirs["base"], tmp_path)  # as `meav train --preset cpu`: top layers only
    c = compress_vector(top, tmp_path / "r6", rank=6)
    report = export_peft(c.path, tiny_dirs["base"], tmp_path / "adapter")
    assert report["lora_modules"] == 7 and report["modules_to_save"] == 2  # 7 linears, 2 norms of layer 1
    ids = torch.tensor([tiny_tokenizer("I have a question about my blood pressure medication").input_ids])
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["base"]), dtype=torch.float32).eval()
    apply_vectors(dense, [(c, 1.0)])
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_dirs["base"]), dtype=torch.float32), str(tmp_path / "adapter"))
    with torch.no_grad():
        want, got = dense(ids).logits, peft.eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["base"]), dtype=torch.float32)(ids).logits
    assert (got - want).abs().max() < 1e-4
    assert (plain - want).abs().max() > 1e-3  # the adapter does change the model


def test_cli_compress_and_export(tiny_dirs, tmp_path):
    from test_sparse_vectors import top_layer_vector

    vec_dir = top_layer_vector(tiny_dirs["base"], tmp_path)
    meav = str(Path(sys.executable).with_name("meav"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([meav, "compress", str(vec_dir), "--out", str(tmp_path / "c"), "--rank", "3",
                           "--peft", str(tmp_path / "p"), "--base", str(tiny_dirs["base"]), "--lora-only"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compressed vector written" in proc.stdout and "PEFT LoRA adapter written" in proc.stdout
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    again = subprocess.run([meav, "compress", str(vec_dir), "--out", str(tmp_path / "c"), "--rank", "3"],
                           capture_output=True, text=True, env=env)
    assert again.returncode != 0 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_peft_export_refuses_what_lora_cannot_express(tiny_dirs, vec_dir, tmp_path):
    c = compress_vector(vec_dir, tmp_path / "r2", rank=2)  # this vector changes the (tied) embedding too
    with pytest.raises(VectorError, match="model.embed_tokens.weight.*Embedding"):
        export_peft(c.path, tiny_dirs["base"], tmp_path / "adapter")
    with pytest.raises(VectorError, match="meav compress"):
        export_peft(vec_dir, tiny_dirs["base"], tmp_path / "adapter")
