"""`meav` merge vs mergekit's task_arithmetic vs the I/O floor, on the embedded model.

Same inputs, same math (θ = θ_base + λ·(θ_aligned − θ_base), normalize: false); each run
in its own process so peak memory is per method. Prints medians of --repeats runs and
the ratios, twice: for the whole process (what `mergekit-yaml` costs on a 135M model, where
starting Python and importing torch, transformers and mergekit is a fixed ~5 s), and after
start-up (the merge alone, timed inside a process that has already imported everything:
what a user merging a 7B model sees). Usage: .venv/bin/python bench/merge.py [--repeats 3]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import ensure_model, median, perturbed_copy, run_measured  # noqa: E402

# The floor's work, one definition for both measurements: read every input tensor, write them out.
COPY_TENSORS = """
from safetensors import safe_open
from safetensors.torch import save_file


def copy_tensors(dst, paths):
    out = {}
    for path in paths:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    save_file(out, dst)
"""

IO_FLOOR = COPY_TENSORS + """
import sys
copy_tensors(sys.argv[1], sys.argv[2:])
"""

# The same work after start-up: imports first, then only the merge (or the floor's I/O) is timed.
AFTER_STARTUP = COPY_TENSORS + """
import sys, time
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
import meav_merge.merge.method  # what the .pth hook would import on first use of mergekit.merge_methods

started = time.perf_counter()
if sys.argv[1] == "floor":
    copy_tensors(sys.argv[2], sys.argv[3:])
else:
    config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
    run_merge(config, sys.argv[2], options=MergeOptions(quiet=True))
print(time.perf_counter() - started)
"""


def _after_startup(args) -> float:
    """Seconds of the merge (or the floor's I/O) alone, in a process that has imported everything."""
    out = subprocess.run([sys.executable, "-c", AFTER_STARTUP, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = ensure_model()
    work = Path(tempfile.mkdtemp(prefix="meav-bench-merge-"))
    aligned = perturbed_copy(model, work / "aligned")
    from meav_merge.vectors.alignment_vector import extract_vector

    vector = work / "vector"
    if not vector.exists():
        extract_vector(aligned, model, vector)
    recipes = {
        "meav": {"merge_method": "meav", "base_model": str(model), "dtype": "float32",
                 "models": [{"model": str(vector), "parameters": {"lambda": -0.5}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(model), "dtype": "float32",
                            "parameters": {"normalize": False},
                            "models": [{"model": str(aligned), "parameters": {"weight": -0.5}}]},
    }
    mk = str(Path(sys.executable).with_name("mergekit-yaml"))
    for name, recipe in recipes.items():
        (work / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    whole = {name: [] for name in (*recipes, "io_floor")}
    orders = [list(recipes), list(reversed(recipes))]
    # interleaved like the after-start-up runs below: the whole-process runs once went all meav,
    # then all task_arithmetic, so a load change mid-run showed up as a ratio (1.04-1.12x on one commit)
    for i in range(args.repeats):
        # the order alternates, so neither method always starts right after the other's 540 MB
        # write (two profiles of the same imports differed by 1.7 s; write-back is one suspect)
        for name in orders[i % 2]:
            whole[name].append(run_measured([mk, str(work / f"{name}.yaml"), str(work / f"out-{name}-{i}")]))
        whole["io_floor"].append(run_measured([sys.executable, "-c", IO_FLOOR, str(work / f"floor-{i}.safetensors"),
                                               str(model / "model.safetensors"), str(vector / "model.safetensors")]))
    results = {name: (median([r[0] for r in runs]), median([r[1] for r in runs])) for name, runs in whole.items()}
    inner = {name: [] for name in results}
    for i in range(args.repeats):  # interleaved, so load drift hits the three alike
        for name in orders[i % 2]:
            inner[name].append(_after_startup([str(work / f"{name}.yaml"), str(work / f"in-{name}-{i}")]))
        inner["io_floor"].append(_after_startup(["floor", str(work / f"in-floor-{i}.safetensors"),
                                                 str(model / "model.safetensors"), str(vector / "model.safetensors")]))
    print(f"{'method':<16} {'seconds':>8} {'peak MiB':>9} {'after start-up s':>17}")
    for name, (s, m) in results.items():
        print(f"{name:<16} {s:8.2f} {m:9.0f} {median(inner[name]):17.2f}")
    per_run = [w[0] / t[0] for w, t in zip(whole["meav"], whole["task_arithmetic"])]
    print("whole process, meav / task_arithmetic per repeat: " + " ".join(f"{r:.2f}x" for r in per_run))
    (ms, mm), (ts, tm), (fs, fm) = results["meav"], results["task_arithmetic"], results["io_floor"]
    mi, ti, fi = (median(inner[k]) for k in ("meav", "task_arithmetic", "io_floor"))
    print(f"\nwhole process   meav / task_arithmetic: time {ms / ts:.2f}x, peak memory {mm / tm:.2f}x")
    print(f"whole process   meav / I/O floor:       time {ms / fs:.2f}x, peak memory {mm / fm:.2f}x")
    print(f"after start-up  meav / task_arithmetic: time {mi / ti:.2f}x")
    print(f"after start-up  meav / I/O floor:       time {mi / fi:.2f}x")


if __name__ == "__main__":
    main()
