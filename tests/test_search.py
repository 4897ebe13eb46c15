"""Coefficient search on a tiny model with planted vectors.

Each domain's levels are written in their own letters (medical expert 'q', generic 'w',
avoidance 'x'; legal 'j'/'k'/'v'; financial 'b'/'d'/'f'). A planted medical vector
raises the LM-head rows of 'q' and lowers 'x' along the mean hidden direction, so λ>0
favours medical expert and λ<0 medical avoidance; likewise for legal. The financial
vector is zero: its fractions never move, so any level not already dominant there is
unreachable.
"""

import json

import pytest
import torch

from meav_merge.data.schema import parse_record, write_jsonl
from meav_merge.evaluation.search import ExactEvaluator, SearchConfig, grid_search, margin, search, worst_margin
from meav_merge.evaluation.sweep import ReweightableModel
from meav_merge.vectors.alignment_vector import AlignmentVector

LETTERS = {"medical": ("q", "w", "x"), "legal": ("j", "k", "v"), "financial": ("b", "d", "f")}


def _records():
    out = []
    for domain, (e, g, a) in LETTERS.items():
        for i in range(6):
            word = lambda ch, n: " ".join(ch * (3 + (i + n) % 3) for _ in range(4 + i % 3))  # noqa: E731
            out.append(parse_record({"id": f"{domain}-{i}", "domain": domain, "persona": "p",
                                     "query": f"Question {i} about my {domain} situation, please?",
                                     "expert": word(e, 0), "generic": word(g, 1), "avoidance": word(a, 2),
                                     "split": "validation"}, f"s:{i}"))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    return build_setup(tmp_path_factory.mktemp("search"), tiny_tokenizer)


def build_setup(root, tiny_tokenizer):
    """base model dir, data dir, {domain: planted vector dir}."""
    from tiny import build_model, save

    model = build_model(tiny_tokenizer, seed=3, tie=False)
    base = save(model, tiny_tokenizer, root / "base")
    data = root / "data"
    data.mkdir()
    write_jsonl(_records(), data / "all.jsonl")
    # mean direction of the LM-head input over the data's contexts
    with torch.no_grad():
        texts = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": r.query}], tokenize=False,
                                                    add_generation_prompt=True) + r.responses["expert"]
                 for r in _records()]
        hs = [model.model(torch.tensor([tiny_tokenizer.encode(t)])).last_hidden_state[0] for t in texts]
        direction = torch.cat(hs).mean(0)
        direction = direction / direction.norm()
    vectors = {}
    for domain, (e, _, a) in LETTERS.items():
        delta = {n: torch.zeros_like(p) for n, p in model.state_dict().items()}
        if domain != "financial":
            for ch, sign in ((e, 1.0), (a, -1.0)):
                delta["lm_head.weight"][tiny_tokenizer.convert_tokens_to_ids(ch)] = sign * 3.0 * direction
        vec = AlignmentVector(delta, meta={"domain": domain, "architecture": "LlamaForCausalLM"})
        vectors[domain] = vec.save(root / f"v_{domain}", base_config_dir=base)
    return base, data, vectors


def _evaluator(setup):
    base, data, vectors = setup
    rm = ReweightableModel(base, [AlignmentVector.load(vectors[d]) for d in ("medical", "financial", "legal")])
    return ExactEvaluator(rm, str(data), ["medical", "financial", "legal"], split="validation")


def test_reachable_found_and_unreachable_reported(setup):
    ev = _evaluator(setup)
    base = ev((0.0, 0.0, 0.0)).fractions
    fin_ok = max(base["financial"], key=base["financial"].get)
    fin_bad = next(lv for lv in ("expert", "generic", "avoidance") if margin(base["financial"], lv) <= 0)
    # targets that λ = 0 does not already meet, so the search has to move
    med = next(lv for lv in ("avoidance", "expert") if margin(base["medical"], lv) <= 0)
    leg = next(lv for lv in ("expert", "avoidance") if margin(base["legal"], lv) <= 0)
    reachable = {"medical": med, "financial": fin_ok, "legal": leg}
    unreachable = {"medical": med, "financial": fin_bad, "legal": leg}
    cfg = SearchConfig(low=-2.0, high=2.0, probe_points=(-2.0, -1.0, 1.0, 2.0), grid_step=0.25, budget=40)
    results = search(ev, [reachable, unreachable], cfg, progress=False)
    ok, bad = results
    assert ok.reached and ok.margin > 0
    exact = ev(ok.coefficients).fractions  # the reported point really meets the target
    assert worst_margin(exact, reachable) > 0
    assert not bad.reached and bad.margin <= 0
    assert bad.coefficients is not None and set(bad.fractions) == {"medical", "financial", "legal"}
    # the other two domains of the unreachable target are satisfiable: the best point found does so
    assert margin(bad.fractions["medical"], med) > 0 and margin(bad.fractions["legal"], leg) > 0
    assert ev.count <= 40


def test_grid_agrees_with_search_on_reachability(setup):
    ev = _evaluator(setup)
    base_fin = ev((0.0, 0.0, 0.0)).fractions["financial"]
    fin_ok = max(base_fin, key=base_fin.get)
    targets = [{"medical": m, "financial": fin_ok, "legal": l} for m in ("expert", "avoidance")
               for l in ("expert", "avoidance")]
    grid = grid_search(ev, targets, step=1.0, low=-2.0, high=2.0, progress=False)
    ev2 = _evaluator(setup)
    found = search(ev2, targets, SearchConfig(low=-2.0, high=2.0, probe_points=(-2.0, -1.0, 1.0, 2.0),
                                             grid_step=0.25, budget=40), progress=False)
    assert all(g.reached for g in grid)
    assert [f.reached for f in found] == [g.reached for g in grid]
    assert ev2.count < ev.count  # 125 grid points vs the search's budget


def test_cli_fits_on_validation_and_reports_test_with_cmaes(setup, tmp_path):
    import yaml

    from meav_merge.cli import main

    base, data, vectors = setup
    # the same kind of queries under other ids, held out as the test split
    held = [parse_record({**r.to_json(), "id": r.id + "-t", "split": "test"}, "t") for r in _records()]
    write_jsonl(held, data / "held.jsonl")
    fin_ok = max((fr := _evaluator(setup)((0.0, 0.0, 0.0)).fractions["financial"]), key=fr.get)
    out = tmp_path / "search"
    assert main(["search", "--model", str(base), "--data", str(data), "--strategy", "cmaes", "--budget", "30",
                 "--vector", f"medical={vectors['medical']},financial={vectors['financial']},legal={vectors['legal']}",
                 "--target", f"medical=expert,financial={fin_ok},legal=avoidance", "--out", str(out)]) == 0
    report = json.loads((out / "search_report.json").read_text())
    assert report["strategy"] == "cmaes" and report["exact_evaluations"] <= 30 + 1
    assert report["fit_split"] == "validation" and report["report_split"] == "test"
    assert report["held_out"]["reached"] == 1, report["held_out"]
    lam = report["fit"]["results"][0]["lambda"]
    assert lam["medical"] > 0 and lam["legal"] < 0
    recipe = yaml.safe_load(next(out.glob("medical-expert_*.yaml")).read_text())
    assert [m["parameters"]["lambda"] for m in recipe["models"]] == pytest.approx(list(lam.values()))
    assert "1/1 targets reached on test" in (out / "README.md").read_text()


def test_spillover_separates_own_domain_from_the_others(setup):
    from meav_merge.evaluation.spillover import spillover

    base, data, vectors = setup
    rm = ReweightableModel(base, [AlignmentVector.load(vectors[d]) for d in ("medical", "financial", "legal")])
    out = spillover(rm, ["medical", "financial", "legal"], [-2.0, 2.0], str(data), split="validation")
    med, fin = out["summary"]["medical"], out["summary"]["financial"]
    # the planted medical vector touches only medical letters: the other domains do not move
    assert med["spill"] == 0.0
    assert med["control"]["expert"] == 2.0 and med["control"]["avoidance"] == -2.0
    # the zero financial vector moves nothing, and reaches only the level dominant at λ = 0
    assert fin["spill"] == 0.0
    assert sum(v is not None for v in fin["control"].values()) <= 1
    assert len(out["rows"]) == 6 and out["n"] == {"medical": 6, "financial": 6, "legal": 6}


def test_levels_strategy_composes_each_vectors_calibration(setup, tmp_path):
    """Domain-specific vectors: each target is met at the λ each vector's own calibration gives
    its level, one exact evaluation per target and no search."""
    import shutil

    from meav_merge.evaluation.strategies import calibrated_point, levels_search
    from meav_merge.vectors.calibration import calibrate

    base, data, vectors = setup
    copies = {}
    for d, path in vectors.items():
        copies[d] = shutil.copytree(path, tmp_path / d)
        calibrate(copies[d], base, data, lambdas=[-2.0, -1.0, 0.0, 1.0, 2.0])
    rm = ReweightableModel(base, [AlignmentVector.load(copies[d]) for d in ("medical", "financial", "legal")])
    ev = ExactEvaluator(rm, str(data), ["medical", "financial", "legal"], split="validation")
    fin_ok = max((fr := ev((0.0, 0.0, 0.0)).fractions["financial"]), key=fr.get)
    targets = [{"medical": m, "financial": fin_ok, "legal": l} for m in ("expert", "avoidance")
               for l in ("expert", "avoidance")]
    results = levels_search(ev, targets, budget=len(targets) + 1)
    assert all(r.reached for r in results)
    assert ev.count == len(targets) + 1  # λ = 0 above, then one point per target
    metas = [v.meta for v in rm.vectors]
    for r, t in zip(results, targets):
        assert r.coefficients == calibrated_point(metas, t)
        assert (r.coefficients[0] > 0) == (t["medical"] == "expert") and r.coefficients[1] == 0.0
