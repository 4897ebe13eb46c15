"""`meav` merge vs mergekit's task_arithmetic vs the I/O floor, on the embedded model.

Same inputs, same math (θ = θ_base + λ·(θ_aligned − θ_base), normalize: false); each run
in its own process so peak memory is per method. Prints medians of --repeats runs and
the ratios. Usage: .venv/bin/python bench/merge.py [--repeats 3]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import ensure_model, median, perturbed_copy, run_measured  # noqa: E402

IO_FLOOR = """
import sys
from safetensors import safe_open
from safetensors.torch import save_file
out = {}
for path in sys.argv[2:]:
    with safe_open(path, "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
save_file(out, sys.argv[1])
"""


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
    results = {}
    for name, recipe in recipes.items():
        cfg = work / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(recipe))
        runs = [run_measured([mk, str(cfg), str(work / f"out-{name}-{i}")]) for i in range(args.repeats)]
        results[name] = (median([r[0] for r in runs]), median([r[1] for r in runs]))
    floor = [run_measured([sys.executable, "-c", IO_FLOOR, str(work / f"floor-{i}.safetensors"),
                           str(model / "model.safetensors"), str(vector / "model.safetensors")])
             for i in range(args.repeats)]
    results["io_floor"] = (median([r[0] for r in floor]), median([r[1] for r in floor]))
    print(f"{'method':<16} {'seconds':>8} {'peak MiB':>9}")
    for name, (s, m) in results.items():
        print(f"{name:<16} {s:8.2f} {m:9.0f}")
    (ms, mm), (ts, tm), (fs, fm) = results["meav"], results["task_arithmetic"], results["io_floor"]
    print(f"\nmeav / task_arithmetic: time {ms / ts:.2f}x, peak memory {mm / tm:.2f}x")
    print(f"meav / I/O floor:       time {ms / fs:.2f}x, peak memory {mm / fm:.2f}x")


if __name__ == "__main__":
    main()
