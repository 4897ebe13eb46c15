"""Per-layer / per-module coefficients: applied by real `mergekit-yaml` exactly as the recipe says,
and fitted by gradient so a planted target that c = 0 misses is reached."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from meav_merge.data.schema import PROFICIENCY_LEVELS, parse_record
from meav_merge.evaluation.coefficient_fit import BlockCoefficientFit, FitConfig, block_of
from meav_merge.evaluation.scoring import prepare
from meav_merge.evaluation.search import fractions_from_scores, margin
from meav_merge.evaluation.sweep import ReweightableModel
from meav_merge.vectors.alignment_vector import AlignmentVector

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))
LAYERS = 3


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_tokenizer):
    from tiny import build_model, save, top_layer_delta

    root = tmp_path_factory.mktemp("blocks")
    model = build_model(tiny_tokenizer, seed=5, layers=LAYERS)
    base = save(model, tiny_tokenizer, root / "base")
    delta = top_layer_delta(model, seed=11, scale=0.3)
    vec = AlignmentVector(delta, meta={"domain": "medical", "architecture": "LlamaForCausalLM"})
    return base, vec.save(root / "vector", base_config_dir=base), model.state_dict(), delta


def _merge(tmp_path, base, vector, lam):
    recipe = {"merge_method": "meav", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(vector), "parameters": {"lambda": lam}}]}
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([MERGEKIT_YAML, str(cfg), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(str(f)))
    return merged


def test_per_layer_and_per_kind_lambdas_are_applied_exactly(planted, tmp_path):
    base, vector, state, delta = planted
    attn, mlp = [1.0, -0.5, 2.0], [0.5, 0.25, -1.5]
    lam = [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp}, {"value": [0.0, 3.0]}]
    merged = _merge(tmp_path, base, vector, lam)
    for name, w in merged.items():
        if name not in delta:
            continue
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer is not None and "self_attn" in name:
            expected_lam = attn[layer]
        elif layer is not None and "mlp" in name:
            expected_lam = mlp[layer]
        elif layer is not None:  # layer norms: a two-point list interpolated across the 3 layers
            expected_lam = [0.0, 1.5, 3.0][layer]
        else:
            expected_lam = 0.0  # mergekit evaluates non-layer tensors at the list's first point
        expected = state[name] + expected_lam * delta[name]
        assert torch.allclose(w, expected, atol=1e-6), (name, expected_lam)
    # the top layer really moved by its own per-kind values, not one scalar
    q = f"model.layers.{LAYERS - 1}.self_attn.q_proj.weight"
    d = f"model.layers.{LAYERS - 1}.mlp.down_proj.weight"
    assert torch.allclose(merged[q] - state[q], 2.0 * delta[q], atol=1e-6)
    assert torch.allclose(merged[d] - state[d], -1.5 * delta[d], atol=1e-6)


def _records():
    out = []
    for i in range(6):
        word = lambda ch, n: " ".join(ch * (3 + (i + n) % 3) for _ in range(4 + i % 3))  # noqa: E731
        out.append(parse_record({"id": f"m-{i}", "domain": "medical", "persona": "p",
                                 "query": f"Question {i} about my health, please?", "expert": word("q", 0),
                                 "generic": word("w", 1), "avoidance": word("x", 2), "split": "validation"},
                                f"s:{i}"))
    return out


def test_gradient_fit_reaches_a_planted_target_that_zero_misses(planted, tmp_path, tiny_tokenizer):
    base, vector, _, _ = planted
    rm = ReweightableModel(base, [AlignmentVector.load(vector)])
    fit = BlockCoefficientFit(rm)
    assert fit.blocks == sorted({block_of(n) for n in rm.changing}) and len(fit.blocks) == 4
    prepared = {"medical": prepare(rm.tokenizer, _records(), levels=PROFICIENCY_LEVELS)}

    def exact(coef):
        fit.apply(coef)
        return fractions_from_scores(torch.tensor(rm.scorer.score(prepared["medical"])).numpy(), PROFICIENCY_LEVELS)

    zero = torch.zeros(1, len(fit.blocks))
    at_zero = exact(zero)
    # the level that is furthest from dominant at c = 0 is the planted target
    level = min(PROFICIENCY_LEVELS, key=lambda lv: margin(at_zero, lv))
    assert margin(at_zero, level) <= 0
    # the differentiable scores agree with the exact scorer
    fit.apply(zero)
    exact_scores = torch.tensor(rm.scorer.score(prepared["medical"]))
    assert torch.allclose(fit.scores(zero, prepared["medical"]).detach().double(), exact_scores.double(), atol=1e-4)
    coef, history = fit.fit(prepared, {"medical": level}, config=FitConfig(steps=40, lr=0.3, tau=0.05))
    assert history[-1] < history[0]
    assert margin(exact(coef), level) > 0, (level, exact(coef))
    # and the recipe form carries one list per tensor kind, as long as the layer count
    setting = fit.lambda_settings(coef)[0]
    assert [c.get("filter") for c in setting] == ["self_attn", "mlp", "layernorm", None]
    assert all(len(c["value"]) == LAYERS for c in setting[:3])


def test_gradient_strategy_spends_no_more_than_its_budget(planted, tmp_path):
    """A fit costs its steps + 1 exact evaluations; one that would pass --budget is not started,
    so the strategies' counts compare at equal cost (issue 13)."""
    import json

    from meav_merge.evaluation.search import ExactEvaluator, SearchResult
    from meav_merge.evaluation.strategies import gradient_refine

    base, vector, _, _ = planted
    (tmp_path / "medical.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in _records()))
    rm = ReweightableModel(base, [AlignmentVector.load(vector)])
    evaluator = ExactEvaluator(rm, str(tmp_path), ["medical"])
    at_zero = evaluator((0.0,))
    level = min(PROFICIENCY_LEVELS, key=lambda lv: margin(at_zero.fractions["medical"], lv))
    missed = SearchResult({"medical": level}, (0.0,), at_zero.fractions, -1.0, False, evaluator.count)
    assert gradient_refine(evaluator, [missed], steps=5, budget=evaluator.count + 5, progress=False) == {}
    assert evaluator.count == 1  # 1 + (5 + 1) would pass the budget of 6: nothing spent
    gradient_refine(evaluator, [missed], steps=5, budget=evaluator.count + 6, progress=False)
    assert evaluator.count == 7
