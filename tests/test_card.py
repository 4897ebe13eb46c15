"""Cards a reader can trust (issue 19): lm-eval's output folder as input, partial runs marked
with their n, metrics only, arrows only where higher is better, and a base_model a reader
can resolve on the Hub, with the local path kept under provenance."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meav_merge.merge.card_results import add_eval_results, load_results
from meav_merge.merge.recipe import merge_recipe
from meav_merge.vectors.alignment_vector import extract_vector

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


@pytest.fixture(scope="module")
def merged(tiny_dirs, tmp_path_factory):
    """A meav merge of the tiny base (recorded as the embedded model's Hub name, as `meav base` does)."""
    root = tmp_path_factory.mktemp("card")
    base = shutil.copytree(tiny_dirs["base"], root / "base")
    (base / "meav_base.json").write_text(json.dumps({"name": HUB_NAME}))
    vec = extract_vector(tiny_dirs["aligned_a"], base, root / "vector").path
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "meav", "base_model": str(base), "dtype": "float32",
                                      "models": [{"model": str(vec), "parameters": {"lambda": 0.5}}]}))
    return merge_recipe(recipe, root / "out", quiet=True)


@pytest.fixture(scope="module")
def lm_eval_folder(merged, tmp_path_factory):
    """Real lm_eval, `--limit 2`, into an --output_path folder (it nests a timestamped file inside)."""
    out = tmp_path_factory.mktemp("lm_eval")
    stale = out / "older_model" / "results_2000-01-01T00-00-00.000000.json"
    stale.parent.mkdir()
    stale.write_text(json.dumps({"results": {"stale_task": {"acc,none": 0.99}}}))
    proc = subprocess.run([str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={merged}",
                           "--tasks", "meav_pref_medical", "--limit", "2", "--output_path", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def eval_section(card: str) -> str:
    return card.split("<!-- meav:eval:begin -->")[1].split("<!-- meav:eval:end -->")[0]


def test_results_folder_partial_run_metrics_only_and_arrows(merged, lm_eval_folder):
    results, used = load_results(lm_eval_folder)
    total = results["n-samples"]["meav_pref_medical"]["original"]  # the shipped medical test split
    assert total > 2
    assert used.name != "results_2000-01-01T00-00-00.000000.json"  # the newest run, not the first found
    section = eval_section(add_eval_results(merged, lm_eval_folder).read_text())
    assert "stale_task" not in section
    assert "Partial run" in section and "`--limit 2`" in section
    rows = [line for line in section.splitlines() if line.startswith("| meav_pref_medical |")]
    metrics = {row.split("|")[2].strip(): row for row in rows}
    assert set(metrics) == {"pref_acc_exp", "pref_acc_gen", "pref_acc_avd", "pref_acc_target ↑"}
    assert all(f"| 2 of {total} (partial) |" in row for row in rows), rows
    for word in ("sample_len", "alias", "_stderr"):
        assert word not in section
    assert section.count("↑") == 2  # pref_acc_target, and the legend that explains it


def test_full_run_has_no_partial_mark_and_lower_is_better_gets_a_down_arrow(merged, tmp_path):
    results = {"results": {"t": {"alias": "t", "sample_len": 5, "acc,none": 0.8, "acc_stderr,none": 0.1,
                                 "perplexity,none": 3.2, "bits,none": 1.0}},
               "higher_is_better": {"t": {"acc": True, "perplexity": False, "bits": None}},
               "n-samples": {"t": {"original": 5, "effective": 5}}}
    section = eval_section(add_eval_results(merged, results).read_text())
    assert "Partial" not in section and "(partial)" not in section
    assert "| t | acc ↑ | 0.800 | 0.100 | 5 |" in section
    assert "| t | perplexity ↓ | 3.200 | – | 5 |" in section
    assert "| t | bits | 1.000 | – | 5 |" in section


def test_numbers_past_float_range_are_written_not_raised(merged):
    # a JSON integer with 400 digits: math.isfinite and the timestamp conversion both raised on it
    huge = 10**400
    results = {"results": {"t": {"alias": "t", "acc,none": huge, "acc_stderr,none": 0.1}},
               "higher_is_better": {"t": {"acc": True}}, "date": huge}
    section = eval_section(add_eval_results(merged, results).read_text())
    assert f"| t | acc ↑ | {huge} | 0.100 |" in section and "UTC" not in section


def test_bad_results_are_one_line_errors(merged, tmp_path):
    with pytest.raises(FileNotFoundError, match="no lm-eval results_"):
        add_eval_results(merged, tmp_path)
    (tmp_path / "r.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"r\.json: not an lm-eval results file"):
        add_eval_results(merged, tmp_path / "r.json")


def test_base_model_is_the_recorded_hub_name_with_local_path_under_provenance(merged):
    card = (merged / "README.md").read_text()
    assert front_matter(card)["base_model"] == [HUB_NAME]
    target = next(line for line in card.splitlines() if line.startswith("Target model"))
    assert HUB_NAME in target and f"local path `{merged.parent / 'base'}`" in target and "fingerprint sha256:" in target


def test_base_without_a_recorded_name_is_not_passed_off_as_one(tiny_dirs, tmp_path):
    vec = extract_vector(tiny_dirs["aligned_a"], tiny_dirs["base"], tmp_path / "v").path
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "meav", "base_model": str(tiny_dirs["base"]),
                                      "models": [{"model": str(vec), "parameters": {"lambda": 1.0}}]}))
    card = (merge_recipe(recipe, tmp_path / "out", quiet=True) / "README.md").read_text()
    assert "base_model" not in front_matter(card)  # a local path resolves to nothing on the Hub
    assert "no Hub name was recorded" in card and str(tiny_dirs["base"]) in card


def test_meav_card_command_takes_the_folder(merged, lm_eval_folder):
    proc = subprocess.run([str(BIN / "meav"), "card", str(merged), "--results", str(lm_eval_folder)],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "2 of " in (merged / "README.md").read_text() and "(partial)" in (merged / "README.md").read_text()
