"""End to end on the embedded SmolLM2-135M-Instruct: materialize, extract, merge with the
plain mergekit-yaml CLI, load and generate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration


def test_materialize_is_idempotent_and_verified(embedded_model, capsys):
    from meav_merge.io.base_model import is_materialized
    from meav_merge.cli.main import main

    assert is_materialized(embedded_model)
    cfg = json.loads((embedded_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (embedded_model / "chat_template.jinja").is_file() or "chat_template" in (
        embedded_model / "tokenizer_config.json").read_text()
    before = (embedded_model / "model.safetensors").stat().st_mtime
    assert main(["base", "--out", str(embedded_model)]) == 0  # second call: verifies, does not rewrite
    assert (embedded_model / "model.safetensors").stat().st_mtime == before
    assert "base model ready" in capsys.readouterr().out


def test_extract_merge_generate(embedded_model, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meav_merge.vectors.alignment_vector import extract_vector

    aligned = tmp_path / "aligned"
    aligned.mkdir()
    for f in embedded_model.iterdir():
        if f.name != "model.safetensors":
            (aligned / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(embedded_model / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    perturbed = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    save_file(perturbed, str(aligned / "model.safetensors"), metadata={"format": "pt"})
    vec = extract_vector(aligned, embedded_model, tmp_path / "vector", meta={"domain": "test"})
    assert vec.meta["architecture"] == "LlamaForCausalLM"

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "meav", "base_model": str(embedded_model),
                                      "models": [{"model": str(vec.path), "parameters": {"lambda": -0.5}}],
                                      "dtype": "float32"}))
    out = tmp_path / "merged"
    proc = subprocess.run([str(Path(sys.executable).with_name("mergekit-yaml")), str(recipe), str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = load_file(str(out / "model.safetensors"))
    n = "model.layers.10.mlp.up_proj.weight"
    assert torch.allclose(merged[n], sd[n] - 0.5 * (perturbed[n] - sd[n]), atol=1e-6)
    assert "| " + str(vec.path) + " | -0.5 |" in (out / "README.md").read_text()

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
