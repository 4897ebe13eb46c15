"""`meav` merge vs mergekit's task_arithmetic vs two I/O floors, on the embedded model.

The floors copy the inputs' tensors to one output file: io_floor lets the write page the inputs
in, read_floor reads every input tensor first, as a merge must (see FLOORS below for why the two
differ at scale on this machine).

Same inputs, same math (θ = θ_base + λ·(θ_aligned − θ_base), normalize: false); each run
in its own process so peak memory is per method. Prints medians of --repeats runs and
the ratios, twice: for the whole process (what `mergekit-yaml` costs on a 135M model, where
starting Python and importing torch, transformers and mergekit is a fixed ~5 s), and after
start-up (the merge alone, timed inside a process that has already imported everything:
what a user merging a 7B model sees). Two vectors: dense (every tensor changed) and top4 (what the
CPU preset trains). Usage: .venv/bin/python bench/merge.py [--repeats 3] [--case dense|top4|both]
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import ensure_model, median, perturbed_copy, run_measured, scratch  # noqa: E402

# The floors' work, one definition for both measurements: open every input tensor, write them out.
# io_floor leaves the reading to the write (the inputs are mmapped, so write() pages them in);
# read_floor reads every tensor first, as any merge does (meav checks each tensor is finite, task_
# arithmetic subtracts). On this machine's kernel (6.18, ext4 large folios, a Firecracker guest) the
# difference is large at scale: a write() whose source is already mapped is copied into large page-
# cache folios, which allocate slowly here, while one that faults mid-copy falls back to 4 KiB folios.
# bench/write_after_read.py shows it without torch or mergekit: a 4.68 GB mapping written out took
# 16.0 s after one read of it against 7.6 s without, and 2.6 s after the read in 64 KiB write() calls.
FLOORS = ("io_floor", "read_floor")
COPY_TENSORS = f"""
from safetensors import safe_open
from safetensors.torch import save_file

FLOORS = {FLOORS!r}


def copy_tensors(floor, dst, paths):
    out = {{}}
    for path in paths:
        with safe_open(path, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    if floor == "read_floor":
        for t in out.values():
            t.sum()
    save_file(out, dst)
"""

IO_FLOOR = COPY_TENSORS + """
import sys
copy_tensors(sys.argv[1], sys.argv[2], sys.argv[3:])
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
if sys.argv[1] in FLOORS:
    copy_tensors(sys.argv[1], sys.argv[2], sys.argv[3:])
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


# dense: every tensor changed, the worst case for the merge (a full-model DPO vector). top4: only
# the top 4 layers and the final norm, what `meav train`'s CPU preset writes (its vector stores
# ~10% of the base); task_arithmetic reads the whole aligned model either way.
CASES = {"dense": 0, "top4": 4}


def _case(model: Path, work: Path, name: str, top_layers: int):
    """(recipes by method, floor inputs) for one kind of vector."""
    from meav_merge.vectors.alignment_vector import extract_vector

    aligned = perturbed_copy(model, work / f"aligned-{name}", top_layers=top_layers)
    vector = work / f"vector-{name}"
    if not vector.exists():
        extract_vector(aligned, model, vector)
    recipes = {
        "meav": {"merge_method": "meav", "base_model": str(model), "dtype": "float32",
                 "models": [{"model": str(vector), "parameters": {"lambda": -0.5}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(model), "dtype": "float32",
                            "parameters": {"normalize": False},
                            "models": [{"model": str(aligned), "parameters": {"weight": -0.5}}]},
    }
    paths = {}
    for method, recipe in recipes.items():
        paths[method] = work / f"{name}-{method}.yaml"
        paths[method].write_text(yaml.safe_dump(recipe))
    return paths, [str(model / "model.safetensors"), str(vector / "model.safetensors")]


def _timed_runs(work: Path, label: str, methods: list, repeats: int, launch, keep_first: bool = False) -> dict:
    """{method or floor: [what ``launch(method, out)`` measured, per repeat]}; ``label`` names the outputs.

    Interleaved: the whole-process runs once went all meav, then all task_arithmetic, so a load change
    mid-run showed up as a ratio (1.04-1.12x on one commit); the order alternates, so neither method
    always starts right after the other's 540 MB write. Each run starts after os.sync(), so none pays
    for the write-back of the one before it (or of the inputs just written: on a 1.1B-shape model that
    alone moved a run by ~2x), and its output is removed once timed (outside the timing), but for the
    first repeat's merges with ``keep_first``, which the caller compares."""
    runs = {method: [] for method in (*methods, *FLOORS)}
    orders = [list(methods), list(reversed(methods))]
    for i in range(repeats):
        for method in (*orders[i % 2], *FLOORS):
            out = work / (f"{label}-{method}.safetensors" if method in FLOORS else f"{label}-{method}-{i}")
            os.sync()
            runs[method].append(launch(method, out))
            if method in FLOORS:
                out.unlink()
            elif not (keep_first and i == 0):
                shutil.rmtree(out)
    return runs


def _measure(work: Path, name: str, recipes: dict, floor_inputs: list, repeats: int) -> None:
    mk = str(Path(sys.executable).with_name("mergekit-yaml"))

    def whole_process(method, out):
        if method in FLOORS:
            return run_measured([sys.executable, "-c", IO_FLOOR, method, str(out), *floor_inputs])
        return run_measured([mk, str(recipes[method]), str(out)])

    def after_startup(method, out):
        if method in FLOORS:
            return _after_startup([method, str(out), *floor_inputs])
        return _after_startup([str(recipes[method]), str(out)])

    whole = _timed_runs(work, f"whole-{name}", list(recipes), repeats, whole_process, keep_first=True)
    inner = _timed_runs(work, f"inner-{name}", list(recipes), repeats, after_startup)
    # the same math, so the same weights: a speed-up of the kernel must not change them
    worst = _max_difference(work / f"whole-{name}-meav-0", work / f"whole-{name}-task_arithmetic-0")
    for method in recipes:
        shutil.rmtree(work / f"whole-{name}-{method}-0")
    results = {k: (median([r[0] for r in runs]), median([r[1] for r in runs]), median(inner[k]))
               for k, runs in whole.items()}
    print(f"\n== {name} vector ==  (meav vs task_arithmetic weights: max |diff| {worst:.1e})")
    print(f"{'method':<16} {'seconds':>8} {'peak MiB':>9} {'after start-up s':>17}")
    for method, (seconds, mib, after) in results.items():
        print(f"{method:<16} {seconds:8.2f} {mib:9.0f} {after:17.2f}")
    per_run = [m[0] / t[0] for m, t in zip(whole["meav"], whole["task_arithmetic"])]
    print("whole process, meav / task_arithmetic per repeat: " + " ".join(f"{r:.2f}x" for r in per_run))
    (ms, mm, mi), (ts, tm, ti) = results["meav"], results["task_arithmetic"]
    print(f"whole process   meav / task_arithmetic: time {ms / ts:.2f}x, peak memory {mm / tm:.2f}x")
    for floor in FLOORS:
        fs, fm, fi = results[floor]
        print(f"whole process   meav / {floor}:{' ' * (16 - len(floor))}time {ms / fs:.2f}x, peak memory {mm / fm:.2f}x")
    print(f"after start-up  meav / task_arithmetic: time {mi / ti:.2f}x")
    for floor in FLOORS:
        print(f"after start-up  meav / {floor}:{' ' * (16 - len(floor))}time {mi / results[floor][2]:.2f}x")


# base + λ·v against base + λ·(aligned − base): v was rounded once when stored, so float32 rounding
TOLERANCE = 1e-6


def _max_difference(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            sys.exit(f"{a} and {b} hold different tensors")
        for k in fa.keys():
            worst = max(worst, (fa.get_tensor(k) - fb.get_tensor(k)).abs().max().item())
    if worst > TOLERANCE:
        sys.exit(f"meav and task_arithmetic differ by {worst:.2e} (> {TOLERANCE:g})")
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", choices=[*CASES, "both"], default="both")
    ap.add_argument("--model", type=Path, help="base model folder (default: the embedded SmolLM2-135M); "
                    "mergekit's per-merge overhead is fixed, so the ratio to the I/O floor depends on the size")
    args = ap.parse_args()
    model = args.model or ensure_model()
    work = scratch("meav-bench-merge-")
    for name, top_layers in CASES.items():
        if args.case in (name, "both"):
            recipes, floor_inputs = _case(model, work, name, top_layers)
            _measure(work, name, recipes, floor_inputs, args.repeats)


if __name__ == "__main__":
    main()
