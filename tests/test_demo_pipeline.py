"""The demo's step runner: finished steps are reused, failures name the step, reruns resume."""

import pytest

from meav_merge.demo import Pipeline, StepFailed


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
