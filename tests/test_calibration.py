"""Vectors that know their levels: `meav calibrate` records them, `level:` in a recipe resolves them."""

import json

import pytest
import yaml
import torch

from meav_merge.cli import main
from meav_merge.vectors.alignment_vector import META_NAME, extract_vector
from meav_merge.vectors.calibration import write_calibration
from test_merge_method import run_mergekit, weights


@pytest.fixture()
def calibrated(tiny_dirs, tmp_path):
    vec = extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path / "vec").path
    write_calibration(vec, {"domain": "medical", "split": "validation", "n": 40, "lambdas": [-2.0, 0.0, 1.5],
                            "levels": {"expert": {"lambda": 1.5, "fraction": 0.8},
                                       "generic": {"lambda": -0.5, "fraction": 0.5}, "avoidance": None}})
    return vec


def test_level_in_a_recipe_merges_at_the_calibrated_lambda(tiny_dirs, calibrated, tmp_path):
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]), "dtype": "float32",
              "models": [{"model": str(calibrated), "parameters": {"level": "generic"}}]}
    run_mergekit(recipe, tmp_path / "out", tmp_path)
    base, aligned, merged = (weights(tiny_dirs["base"]), weights(tiny_dirs["aligned_a"]), weights(tmp_path / "out"))
    for name, w in merged.items():
        assert torch.allclose(w, base[name] - 0.5 * (aligned[name] - base[name]), atol=1e-6), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "-0.5 (level: generic, from the vector's calibration)" in card


@pytest.mark.parametrize("params, needle", [
    ({"level": "avoidance"}, "level 'avoidance' was never dominant"),
    ({"level": "expert", "lambda": 1.0}, "give `lambda` or `level`, not both"),
    ({"level": "expertt"}, "level 'expertt' is not one of"),
])
def test_level_errors_name_the_entry(tiny_dirs, calibrated, tmp_path, params, needle):
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
              "models": [{"model": str(calibrated), "parameters": params}]}
    proc = run_mergekit(recipe, tmp_path / "out", tmp_path, check=False)
    assert proc.returncode != 0 and needle in proc.stderr and "models[0]" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_uncalibrated_vector_with_level_is_refused(tiny_dirs, tmp_path):
    vec = extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], tmp_path / "plain").path
    recipe = {"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
              "models": [{"model": str(vec), "parameters": {"level": "expert"}}]}
    proc = run_mergekit(recipe, tmp_path / "out", tmp_path, check=False)
    assert proc.returncode != 0 and "needs a calibrated vector; run `meav calibrate" in proc.stderr


@pytest.fixture(scope="module")
def search_setup(tmp_path_factory, tiny_tokenizer):
    from test_search import build_setup

    return build_setup(tmp_path_factory.mktemp("calib"), tiny_tokenizer)


def test_calibrate_command_on_planted_vector(search_setup, capsys):
    base, data, vectors = search_setup
    assert main(["calibrate", str(vectors["medical"]), "--model", str(base), "--data", str(data),
                 "--lambdas", "-3,-1,0,1,3"]) == 0
    cal = json.loads((vectors["medical"] / META_NAME).read_text())["calibration"]
    assert cal["split"] == "validation" and cal["n"] == 6
    # the planted vector raises expert letters for λ > 0 and avoidance letters for λ < 0
    assert cal["levels"]["expert"]["lambda"] > 0 or cal["levels"]["expert"]["lambda"] == 0
    assert cal["levels"]["avoidance"]["lambda"] < 0
    assert main(["vector", "info", str(vectors["medical"])]) == 0
    out = capsys.readouterr().out
    assert "calibration (validation, n=6)" in out and "avoidance" in out


def test_calibration_stops_once_every_level_is_found_and_agrees_with_the_full_grid(search_setup):
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.sweep import ReweightableModel, sweep
    from meav_merge.vectors.alignment_vector import AlignmentVector
    from meav_merge.vectors.calibration import _smallest_per_level, calibrate

    base, data, vectors = search_setup
    grid = [-4.0, -3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0]
    records = load_records(data, "medical", "validation")
    full = sweep(ReweightableModel(base, [AlignmentVector.load(vectors["medical"])]), records, grid)
    expected = _smallest_per_level(grid, full, records[0].levels)
    cal = calibrate(vectors["medical"], base, data, lambdas=grid)
    assert cal["levels"] == expected
    swept = [p["lambda"] for p in cal["sweep"]]
    assert swept == sorted(swept, key=lambda x: (abs(x), x))  # by growing |λ|
    if all(expected.values()):  # every level found: nothing past the last one needed
        assert len(swept) < len(grid) and max(abs(v["lambda"]) for v in expected.values()) == abs(swept[-1])


def test_serve_preset_from_a_recipe_names_vectors_by_domain_and_resolves_levels(tiny_dirs, calibrated, tmp_path):
    # Two runs' vectors share the folder name "vector"; the preset must still tell them apart.
    from meav_merge.serving.settings import preset_from_recipe

    other = extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], tmp_path / "legal_run" / "vector",
                           meta={"domain": "legal"}).path
    recipe = tmp_path / "insurance.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "meav", "base_model": str(tiny_dirs["base"]),
        "models": [{"model": str(calibrated), "parameters": {"level": "generic"}},
                   {"model": str(other), "parameters": {"lambda": 0.6}}]}))
    vectors: dict = {}
    assert preset_from_recipe(recipe, vectors) == (("legal", 0.6), ("vec", -0.5))  # no domain: folder name
    assert vectors == {"vec": str(calibrated), "legal": str(other)}
    # served on another model than the recipe's base_model, the preset would mean something else
    assert preset_from_recipe(recipe, {}, served_model=tiny_dirs["base"]) == (("legal", 0.6), ("vec", -0.5))
    with pytest.raises(ValueError, match=r"insurance.yaml: base_model .* is not the served model .*; serve it "
                                         r"with --model"):
        preset_from_recipe(recipe, {}, served_model=tmp_path)


def test_eval_grid_scores_every_combination_like_single_points(search_setup, tmp_path, capsys):
    # `meav eval grid`: the Preference Vectors paper's η × η table, for any vectors
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.scoring import prepare
    from meav_merge.evaluation.sweep import ReweightableModel, evaluate_point
    from meav_merge.vectors.alignment_vector import AlignmentVector

    base, data, vectors = search_setup
    out = tmp_path / "grid"
    assert main(["eval", "grid", "--model", str(base), "--data", str(data), "--vector",
                 f"medical={vectors['medical']},legal={vectors['legal']}", "--values", "-1,0,2",
                 "--domains", "medical,legal", "--split", "validation", "--out", str(out)]) == 0
    rows = json.loads((out / "grid.json").read_text())["rows"]
    assert [(r["medical"], r["legal"]) for r in rows] == [(a, b) for a in (-1, 0, 2) for b in (-1, 0, 2)]
    rm = ReweightableModel(base, [AlignmentVector.load(vectors[d]) for d in ("medical", "legal")])
    recs = load_records(data, "legal", "validation")
    point = evaluate_point(rm, [2.0, -1.0], prepare(rm.tokenizer, recs), recs[0].levels)
    row = next(r for r in rows if (r["medical"], r["legal"]) == (2, -1))
    assert {lv: row[f"legal:{lv}"] for lv in recs[0].levels} == point.fractions
    assert (out / "grid_medical_expert.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "grid", "--model", str(base), "--data", str(data), "--vector", f"m={vectors['medical']}",
                 "--out", str(tmp_path / "g1")]) != 0
    assert "a grid needs two or more vectors" in capsys.readouterr().err and not (tmp_path / "g1").exists()


def test_sweep_command_writes_its_files_and_says_where(search_setup, tmp_path, capsys):
    base, data, vectors = search_setup
    out = tmp_path / "sw"
    assert main(["sweep", "--model", str(base), "--data", str(data), "--vector", f"medical={vectors['medical']}",
                 "--split", "validation", "--lambdas=-1,0,1", "--out", str(out)]) == 0
    assert {f.name for f in out.iterdir()} == {"sweep_medical.csv", "sweep_medical.json", "sweep_medical.png"}
    assert f"wrote sweep_medical.csv/.json/.png into {out}" in capsys.readouterr().out


def test_ood_command_writes_the_table_its_n_and_a_plot(search_setup, tmp_path, capsys):
    """`meav eval ood`: the rows equal ood_table's, the JSON says n per domain and the split,
    and a PNG comes with them (issue 17 asks for CSV/JSON + PNG per experiment)."""
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.sweep import ReweightableModel
    from meav_merge.evaluation.tables import ood_table
    from meav_merge.vectors.alignment_vector import AlignmentVector

    base, data, vectors = search_setup
    out = tmp_path / "ood"
    assert main(["eval", "ood", "--model", str(base), "--data", str(data), "--vector", f"medical={vectors['medical']}",
                 "--lambdas=-2,0,2", "--domains", "medical,legal", "--split", "validation", "--limit", "3",
                 "--out", str(out)]) == 0
    saved = json.loads((out / "ood.json").read_text())
    rm = ReweightableModel(base, [AlignmentVector.load(vectors["medical"])])
    assert saved["rows"] == ood_table(rm, [-2.0, 0.0, 2.0], str(data), ["medical", "legal"], split="validation",
                                      limit=3)
    assert saved["split"] == "validation"
    assert saved["n"] == {d: min(3, len(load_records(data, d, "validation"))) for d in ("medical", "legal")}
    assert (out / "ood.png").read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {out}/ood.csv, ood.json and ood.png" in capsys.readouterr().out
