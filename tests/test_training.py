"""DPO training of alignment vectors on a tiny random model (trl DPOTrainer, IPO loss)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meav_merge.data.schema import parse_record, write_jsonl
from meav_merge.training.dpo import MeavTrainConfig, pair_rows, preference_pairs, train_vector


def _records(domain="medical", n=6):
    out = []
    for i in range(n):
        out.append(parse_record({
            "id": f"{domain[:3]}-{i}", "domain": domain, "persona": "someone",
            "query": f"Question number {i} about my tax return and blood pressure?",
            "expert": f"Take 500 mg twice a day for {i + 3} days and check your kidney function.",
            "generic": "Generally, it is a good idea to see a professional about this.",
            "avoidance": "I'm sorry, I can't help with that; please see an expert.",
            "split": "validation" if i == 0 else "test" if i == 1 else "train"}, f"t:{i}"))
    return out


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(_records("medical"), d / "medical.jsonl")
    write_jsonl(_records("legal"), d / "legal.jsonl")
    return d


TINY = dict(trainable_layers=1, max_length=96, learning_rate=1e-3, per_device_train_batch_size=2, save_steps=1,
            logging_steps=1)


def test_pairs_follow_levels_and_targets():
    r = _records()[0]
    assert preference_pairs(r) == [("expert", "generic"), ("generic", "avoidance")]
    assert preference_pairs(r, "avoidance") == [("avoidance", "generic"), ("generic", "expert")]
    assert sorted(preference_pairs(r, "generic")) == [("generic", "avoidance"), ("generic", "expert")]
    rows = pair_rows([r], swap=True)
    assert rows[0]["chosen"][0]["content"] == r.responses["generic"]


def test_train_writes_vector_with_metadata(tiny_dirs, data_dir, tmp_path):
    out = train_vector(tiny_dirs["base"], data_dir, tmp_path / "run", domain="medical",
                       config=MeavTrainConfig(**TINY))
    meta = json.loads((out / "vector" / "meav_vector.json").read_text())
    assert meta["domain"] == "medical"
    assert meta["preference"] == "expert > generic > avoidance"
    # the published folder, not the temp one the vector was extracted in
    assert Path(meta["aligned"]) == tmp_path / "run" / "aligned"
    t = meta["training"]
    assert t["loss_type"] == "ipo" and t["beta"] == 0.1 and t["trainer"] == "trl.DPOTrainer"
    assert t["data"]["train_records"] == 4 and t["data"]["train_pairs"] == 8 and t["data"]["validation_pairs"] == 2
    assert t["data"]["file_sha256"].startswith("sha256:")
    assert "eval_loss" in t["metrics"]["plus"]
    v = load_file(str(out / "vector" / "model.safetensors"))
    a = load_file(str(out / "aligned" / "model.safetensors"))
    b = load_file(str(tiny_dirs["base"] / "model.safetensors"))
    for n in v:
        assert torch.allclose(v[n], a[n] - b[n])
    # only the top layer and the final norm train (the trunk is frozen)
    assert v["model.layers.1.mlp.down_proj.weight"].abs().max() > 0
    assert v["model.norm.weight"].abs().max() > 0
    # frozen tensors did not change, so the vector does not store them (read as zero)
    assert "model.layers.0.mlp.down_proj.weight" not in v.keys()
    assert "model.embed_tokens.weight" not in v.keys()
    assert not (tmp_path / "run.partial").exists()


def test_frozen_trunk_equals_plain_training(tiny_dirs, data_dir, tmp_path):
    """The trunk/head split is an optimization: same data, same seed, same weights."""
    fast = train_vector(tiny_dirs["base"], data_dir, tmp_path / "fast", domain="medical",
                        config=MeavTrainConfig(**TINY))
    plain = train_vector(tiny_dirs["base"], data_dir, tmp_path / "plain", domain="medical",
                         config=MeavTrainConfig(**TINY, frozen_trunk=False))
    f = load_file(str(fast / "vector" / "model.safetensors"))
    p = load_file(str(plain / "vector" / "model.safetensors"))
    for n in f:
        assert torch.allclose(f[n], p[n], atol=1e-5), n


def test_preference_vector_mode(tiny_dirs, data_dir, tmp_path):
    out = train_vector(tiny_dirs["base"], data_dir, tmp_path / "pv", domain="medical", preference_vector=True,
                       config=MeavTrainConfig(**TINY))
    plus = load_file(str(out / "aligned" / "model.safetensors"))
    minus = load_file(str(out / "minus" / "model.safetensors"))
    pv = load_file(str(out / "preference_vector" / "model.safetensors"))
    n = "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(pv[n], plus[n] - minus[n])
    assert pv[n].abs().max() > 0
    meta = json.loads((out / "preference_vector" / "meav_vector.json").read_text())
    assert meta["kind"] == "preference_vector"
    assert (Path(meta["aligned"]), Path(meta["minus"])) == (tmp_path / "pv" / "aligned", tmp_path / "pv" / "minus")


def test_joint_training_and_errors(tiny_dirs, data_dir, tmp_path):
    out = train_vector(tiny_dirs["base"], data_dir, tmp_path / "joint",
                       joint={"medical": "avoidance", "legal": "expert"}, config=MeavTrainConfig(**TINY))
    meta = json.loads((out / "vector" / "meav_vector.json").read_text())
    assert meta["joint_targets"] == {"medical": "avoidance", "legal": "expert"}
    assert meta["training"]["data"]["train_pairs"] == 16
    with pytest.raises(ValueError, match="no records for domain 'financial'"):
        train_vector(tiny_dirs["base"], data_dir, tmp_path / "x", domain="financial", config=MeavTrainConfig(**TINY))
    with pytest.raises(FileExistsError):
        train_vector(tiny_dirs["base"], data_dir, out, domain="medical", config=MeavTrainConfig(**TINY))
    bad = data_dir / "medical.jsonl"
    bad.write_text(bad.read_text() + '{"id": "broken", "domain": "medical"}\n')
    with pytest.raises(ValueError, match=r"medical.jsonl:7: missing or empty field 'query'"):
        train_vector(tiny_dirs["base"], data_dir, tmp_path / "y", domain="medical", config=MeavTrainConfig(**TINY))


def test_resume_after_interruption(tiny_dirs, data_dir, tmp_path, monkeypatch):
    from trl import DPOTrainer

    original = DPOTrainer.training_step
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPOTrainer, "training_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_vector(tiny_dirs["base"], data_dir, tmp_path / "run", domain="medical", config=MeavTrainConfig(**TINY))
    assert not (tmp_path / "run").exists()
    assert list((tmp_path / "run.partial" / "plus-trainer").glob("checkpoint-*"))
    monkeypatch.setattr(DPOTrainer, "training_step", original)
    # other flags must not resume this run's checkpoint (a mixture of two runs); it is kept
    with pytest.raises(FileExistsError, match=r"run.partial: left by a cut-off run with other data or settings"):
        train_vector(tiny_dirs["base"], data_dir, tmp_path / "run", domain="medical",
                     config=MeavTrainConfig(**{**TINY, "learning_rate": 2e-3}))
    assert list((tmp_path / "run.partial" / "plus-trainer").glob("checkpoint-*"))
    out = train_vector(tiny_dirs["base"], data_dir, tmp_path / "run", domain="medical", config=MeavTrainConfig(**TINY))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["plus"]["resumed_from"].endswith("checkpoint-2")


def test_one_command_trains_several_domains_and_checks_control(tiny_dirs, data_dir, tmp_path, capsys):
    from meav_merge.cli.main import main

    runs = tmp_path / "runs"
    assert main(["train", "--domain", "medical,legal", "--base", str(tiny_dirs["base"]), "--data", str(data_dir),
                 "--out", str(runs), "--trainable-layers", "1", "--max-length", "96", "--lr", "1e-3",
                 "--batch-size", "2", "--check=-1,1"]) == 0
    out = capsys.readouterr().out
    for d in ("medical", "legal"):
        assert json.loads((runs / d / "vector" / "meav_vector.json").read_text())["domain"] == d
        assert (runs / d / "control" / f"sweep_{d}.csv").read_text().count("\n") == 3  # header + 2 λ
        assert f"{d}: λ-control " in out


def test_lambda_control_criterion():
    from meav_merge.evaluation.sweep import lambda_control

    def summary(exp_at_pos, avd_at_neg):
        pts = [{"lambda": -1.0, "pref_acc_expert": 0.0, "pref_acc_generic": 1 - avd_at_neg, "pref_acc_avoidance": avd_at_neg},
               {"lambda": 0.0, "pref_acc_expert": 0.9, "pref_acc_generic": 0.0, "pref_acc_avoidance": 0.9},
               {"lambda": 2.0, "pref_acc_expert": exp_at_pos, "pref_acc_generic": 1 - exp_at_pos, "pref_acc_avoidance": 0.0}]
        return {"levels": ["expert", "generic", "avoidance"], "points": pts}

    assert lambda_control(summary(0.8, 0.7))["met"]
    assert not lambda_control(summary(0.78, 0.9))["met"]
    assert not lambda_control(summary(0.9, 0.69))["met"]  # λ = 0 points count for neither side


def test_trunk_warm_shares_the_common_prompt_prefix(tiny_dirs):
    """Prompts that share a system turn: the warmed trunk states (prefix run once, each prompt
    and its responses continuing from its cache) equal a plain forward of each row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meav_merge.training.trunk import _common_prefix, split_model

    tok = AutoTokenizer.from_pretrained(str(tiny_dirs["base"]))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dirs["base"]), dtype=torch.float32)
    _, head = split_model(model, 1)
    emb = head.model.embed_tokens
    system = tok("<|im_start|>system\nyou help<|im_end|>\n", add_special_tokens=False).input_ids
    groups = []
    for q in ("tax return", "landlord notice", "blood pressure pills"):
        prompt = system + tok(q, add_special_tokens=False).input_ids
        groups.append((prompt, [prompt + tok(a, add_special_tokens=False).input_ids for a in (" take 500 mg", " sorry")]))
    assert _common_prefix([p for p, _ in groups]) == tuple(system)
    misses, hits = emb.misses, emb.hits  # split_model's own exactness check counted one
    emb.warm(groups)
    assert len(emb.cache) == 6
    with torch.no_grad():
        for _, rows in groups:
            for r in rows:
                want = model.model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states[1][0]
                assert torch.allclose(emb.hidden(torch.tensor(r)), want, atol=1e-5)
    assert (emb.misses, emb.hits) == (misses, hits + 6)  # every row came from the warmed cache
    assert _common_prefix([(1, 2, 3), (1, 2)]) == (1,)  # every prompt keeps a token of its own
    assert _common_prefix([(5, 2), (1, 2)]) == () and _common_prefix([(1, 2)]) == ()


@pytest.mark.parametrize("kw, key", [({"beta": float("nan")}, "beta"), ({"learning_rate": "1e-4"}, "learning_rate"),
                                     ({"seed": True}, "seed"), ({"precision": "fp16"}, "precision"),
                                     ({"save_steps": 2.5}, "save_steps"), ({"num_train_epochs": 0}, "num_train_epochs")])
def test_train_config_refuses_what_its_flags_refuse(kw, key):
    # the Python API gets the same one-line, keyed refusal as `meav train --beta nan`
    with pytest.raises(ValueError, match=f"^{key}: "):
        MeavTrainConfig(**kw)
