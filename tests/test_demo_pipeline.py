"""The demo's step runner: finished steps are reused, failures name the step, reruns resume."""

import pytest

from meav_merge.demo.pipeline import Pipeline, StepFailed


def test_steps_resume_and_failures_name_the_step(tmp_path):
    calls = []
    out = tmp_path / "a.txt"

    def make_a():
        calls.append("a")
        out.write_text("x")
        return {"ok": 1}

    def broken():
        calls.append("b")
        raise ValueError("disk full")

    pipe = Pipeline(tmp_path / "state.json")
    assert pipe.run("a", make_a, {"v": 1}, [out], "hint") == {"ok": 1}
    with pytest.raises(StepFailed, match="step 'b' failed: disk full. Free some space"):
        pipe.run("b", broken, {}, [], "Free some space.")
    # a new process: step a is reused, b runs again
    pipe2 = Pipeline(tmp_path / "state.json")
    assert pipe2.run("a", make_a, {"v": 1}, [out], "hint") == {"ok": 1}
    assert calls == ["a", "b"]
    # changed inputs or a missing output re-run the step
    pipe2.run("a", make_a, {"v": 2}, [out], "hint")
    out.unlink()
    pipe2.run("a", make_a, {"v": 2}, [out], "hint")
    assert calls == ["a", "b", "a", "a"]


def test_demo_evaluations_share_one_model_and_match_single_vector_runs(tiny_dirs, tmp_path, monkeypatch):
    """Sweeps, OOD table and Table 1 of the demo load the model once, move one vector at a
    time (the others stay at 0), and agree with each other where they meet (λ = 0)."""
    import meav_merge.evaluation.sweep as sweep_mod
    from meav_merge.demo import report as demo_report
    from meav_merge.demo.pipeline import DemoConfig
    from meav_merge.evaluation.tables import ood_table
    from meav_merge.resources import data_dir
    from meav_merge.vectors.alignment_vector import AlignmentVector, extract_vector

    monkeypatch.setenv("MEAV_MERGE_CACHE", str(tmp_path / "cache"))
    vectors = {"medical": extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path / "v_med").path,
               "financial": extract_vector(tiny_dirs["aligned_b"], tiny_dirs["base"], tmp_path / "v_fin").path}
    cfg = DemoConfig(model_dir=tiny_dirs["base"], data=data_dir(), queries=3, lambdas=(-8.0, 0.0, 8.0),
                     judged_answers=2, max_new_tokens=3)
    loads = []
    real_init = sweep_mod.ReweightableModel.__init__
    monkeypatch.setattr(sweep_mod.ReweightableModel, "__init__",
                        lambda self, *a, **k: loads.append(1) or real_init(self, *a, **k))
    session = demo_report.Session(cfg, vectors)
    report = tmp_path / "report"
    report.mkdir()
    sweeps = demo_report.sweeps(session, report)
    ood = demo_report.ood(session, sweeps["medical"], report)
    t1 = demo_report.table1(session, sweeps["medical"], report)
    assert len(loads) == 1
    assert {p.name for p in report.iterdir()} >= {"sweep_medical.png", "sweep_financial.png", "ood_medical.csv",
                                                  "table1_medical.csv"}
    at_zero = {p["lambda"]: p for p in sweeps["medical"]["points"]}[0.0]
    default = t1["rows"][0]
    assert default["technique"] == "default"
    assert all(default[f"pref:{lv}"] == at_zero[f"pref_acc_{lv}"] for lv in ("expert", "generic", "avoidance"))
    assert {r["technique"].split(" ")[0] for r in t1["rows"]} >= {"prompting:expert", "meav:expert"}
    assert all(0 <= default[f"judged:{lv}"] <= 1 for lv in ("expert", "generic", "avoidance"))
    # the financial vector, loaded too, stays at 0 while the medical one moves
    alone = sweep_mod.ReweightableModel(tiny_dirs["base"], [AlignmentVector.load(vectors["medical"])])
    lams = [r["lambda"] for r in ood["rows"]]
    assert ood["rows"] == ood_table(alone, lams, str(cfg.data), ["financial", "legal", "safety", "helpfulness"],
                                    limit=cfg.queries)
    moved = {p["lambda"]: p for p in sweeps["financial"]["points"]}
    assert moved[8.0] != moved[-8.0]  # each vector does move its own domain


def test_a_vector_trained_with_other_settings_is_not_reused(tmp_path):
    # `make demo` once reused any finished runs/composed, so a changed default never reached it
    import json

    from meav_merge.demo.pipeline import _trained_with
    from meav_merge.training.composed import ComposedTrainConfig

    vector = tmp_path / "vector"
    assert not _trained_with(vector, ComposedTrainConfig())  # nothing there: train
    vector.mkdir()
    recorded = json.loads(json.dumps(ComposedTrainConfig().to_dict()))
    (vector / "meav_vector.json").write_text(json.dumps({"training": {**recorded, "log": []}}))
    assert _trained_with(vector, ComposedTrainConfig())
    assert not _trained_with(vector, ComposedTrainConfig(fluency_weight=0.5))
    assert not _trained_with(vector, ComposedTrainConfig(steps=10))
    # a record from before a field existed matches the value the field declares for that time
    # (fluency_rows: "all", what the term did before the flag), and nothing else
    del recorded["fluency_rows"]
    (vector / "meav_vector.json").write_text(json.dumps({"training": {**recorded, "log": []}}))
    assert _trained_with(vector, ComposedTrainConfig(fluency_rows="all"))
    assert not _trained_with(vector, ComposedTrainConfig(fluency_rows="target"))
    # a field without that declaration: an old record lacking it is trained again
    del recorded["fluency_top_k"]
    (vector / "meav_vector.json").write_text(json.dumps({"training": {**recorded, "log": []}}))
    assert not _trained_with(vector, ComposedTrainConfig(fluency_rows="all"))


def test_medical_trains_with_the_rpo_anchor_and_safety_without(tmp_path):
    # medical_expert.yaml's λ = +1 was looping / emitting emoji without the anchor (issue 19)
    import pytest

    from meav_merge.demo.pipeline import DemoConfig, Pipeline, _train_steps

    class Recording(Pipeline):
        def run(self, name, fn, inputs, outputs, hint):
            self.state[name] = {"inputs": inputs, "hint": hint}
            return {}

    pipe = Recording(tmp_path / "state.json")
    _train_steps(pipe, DemoConfig(runs=tmp_path))
    assert pipe.state["train_medical"]["inputs"]["config"]["sft_weight"] == 1.0
    assert "--sft-weight 1" in pipe.state["train_medical"]["hint"]
    assert pipe.state["train_safety"]["inputs"]["config"]["sft_weight"] == 0.0
    assert "--sft-weight" not in pipe.state["train_safety"]["hint"]
    with pytest.raises(ValueError, match="--rpo-domains"):
        DemoConfig(rpo_domains=("legal",))


def test_an_old_demo_state_still_keys_the_merge_on_the_composed_fingerprints():
    # before the composed step reported "trained", its result was the fingerprints alone; a rerun
    # of an old out/ must key the merge the same way, not on a missing "fingerprints" entry
    from meav_merge.demo.pipeline import _composed_fingerprints

    prints = {"medical": "ab12", "legal": "cd34"}
    assert _composed_fingerprints({"fingerprints": prints, "trained": False}) == prints
    assert _composed_fingerprints(prints) == prints
