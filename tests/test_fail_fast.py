"""Plain `mergekit-yaml` on a `meav` recipe fails fast and says why (issue 19).

A relative path that does not exist from the current folder used to end, after ~40 lines of
traceback, in a Hub connection error: mergekit takes any missing path for a repo id. The
import hook checks the recipe's local paths before mergekit loads anything, and reports
any `meav` recipe error as one line naming the path and the folder it was resolved against.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meav_merge.vectors.alignment_vector import extract_vector

MERGEKIT_YAML = str(Path(sys.executable).with_name("mergekit-yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def project(tiny_dirs, tmp_path_factory):
    """A folder laid out like the repository: models/base, runs/medical/{aligned,vector}."""
    import shutil

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(tiny_dirs["base"], root / "models" / "base")
    shutil.copytree(tiny_dirs["aligned_a"], root / "runs" / "medical" / "aligned")
    extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], root / "runs" / "medical" / "vector")
    return root


def run_in(cwd: Path, recipe: dict, out="out"):
    (cwd / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return subprocess.run([MERGEKIT_YAML, "recipe.yaml", out], cwd=cwd, capture_output=True, text=True, env=ENV)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "huggingface" not in stderr.lower()
    return lines[0]


@pytest.mark.parametrize("where, recipe", [
    ("base_model: models/base", {"base_model": "models/base",
                                 "models": [{"model": "runs/medical/vector", "parameters": {"lambda": 1.0}}]}),
    ("models[0]: runs/medical/vector", {"base_model": "{root}/models/base",
                                       "models": [{"model": "runs/medical/vector", "parameters": {"lambda": 1.0}}]}),
    ("models[0].unaligned: models/base", {"base_model": "{root}/models/base", "models": [
        {"model": "{root}/runs/medical/aligned", "parameters": {"lambda": 1.0, "unaligned": "models/base"}}]}),
])
def test_missing_relative_path_is_one_line_naming_path_and_folder(project, tmp_path, where, recipe):
    # run from a folder where the recipe's relative paths do not exist (a fresh shell elsewhere)
    recipe = yaml.safe_load(yaml.safe_dump({"merge_method": "meav", "dtype": "float32", **recipe})
                            .replace("{root}", str(project)))
    proc = run_in(tmp_path, recipe)
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert where in line and "no such directory" in line
    assert f"current folder {tmp_path}" in line
    assert not (tmp_path / "out").exists()


def test_the_same_recipe_runs_from_its_folder_and_says_where_it_wrote(project):
    recipe = {"merge_method": "meav", "base_model": "models/base", "dtype": "float32",
              "models": [{"model": "runs/medical/vector", "parameters": {"lambda": 1.0}}]}
    proc = run_in(project, recipe, out="merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (project / "merged" / "model.safetensors").is_file()
    assert f"merged model written to {project / 'merged'}" in proc.stdout


def test_recipe_errors_from_validation_are_one_line_too(project, tmp_path):
    recipe = {"merge_method": "meav", "base_model": str(project / "models" / "base"),
              "models": [{"model": str(project / "runs" / "medical" / "vector"), "parameters": {"lamda": 1.0}}]}
    proc = run_in(tmp_path, recipe)
    assert proc.returncode == 2
    assert "unknown parameter 'lamda'" in one_line(proc.stderr)


def test_other_merge_methods_are_left_to_mergekit(project, tmp_path):
    """The hook passes non-meav recipes through: mergekit's own error, not ours."""
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": "models/nowhere", "parameters": {"weight": 1.0}}]}
    proc = run_in(tmp_path, recipe)
    assert proc.returncode != 0
    assert "meav recipe" not in proc.stderr and "Traceback" in proc.stderr


@pytest.mark.parametrize("argv", [
    ["judge", "--model", "models/nothere", "--domain", "medical", "--out", "o"],
    ["sweep", "--model", "models/nothere", "--vector", "m=runs/medical/vector", "--out", "o"],
    ["calibrate", "runs/medical/vector", "--model", "models/nothere"],
    ["extract", "--aligned", "runs/nothere", "--base", "models/base", "--out", "o"],
])
def test_meav_commands_name_a_missing_model_folder_before_loading(project, tmp_path, argv):
    # transformers would take the path for a Hub repo id and fail on the network, minutes later
    proc = subprocess.run([str(Path(sys.executable).with_name("meav")), *argv], cwd=tmp_path, capture_output=True,
                          text=True, env=ENV)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "no such directory" in line and f"relative to the current folder {tmp_path}" in line
    assert not (tmp_path / "o").exists()
