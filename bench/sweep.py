"""Seconds per λ point: `meav sweep` (in-memory re-weighting) vs merge-to-disk + reload +
lm-eval for the same point, on the embedded model and the same queries.

Usage: .venv/bin/python bench/sweep.py [--vector runs/medical/vector] [--queries 8] [--disk-points 3]
(without --vector a stand-in vector from a copy of the model with its top 4 layers perturbed is used).

The in-memory sweep runs `meav sweep`'s default grid (13 λ points): its first point pays for
the frozen layers' states, which the rest reuse, so its cost per point depends on how many
points share that work, and the grid a user gets by default is the honest count. Merge +
reload + lm-eval costs the same at every point, so it is timed on --disk-points of them
(each checked against the in-memory fractions).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, ensure_model, perturbed_copy, scratch  # noqa: E402

from meav_merge.vectors.calibration import DEFAULT_LAMBDAS  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vector")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--lambdas", default=",".join(f"{x:g}" for x in DEFAULT_LAMBDAS),
                    help="the in-memory sweep's grid (default: meav sweep's, the calibration grid)")
    ap.add_argument("--disk-points", type=int, default=3, help="points of that grid timed by merge + reload + lm-eval")
    args = ap.parse_args()
    model = ensure_model()
    work = scratch("meav-bench-sweep-")
    if args.vector:
        vector = Path(args.vector)
    else:
        from meav_merge.vectors.alignment_vector import extract_vector

        vector = work / "vector"
        # the top 4 layers, like a CPU-preset vector, so the frozen-layer reuse applies
        extract_vector(perturbed_copy(model, work / "aligned", top_layers=4), model, vector)
    from meav_merge.data.schema import load_records, write_jsonl

    data = work / "medical.jsonl"
    write_jsonl(load_records(ROOT / "data", "medical", "test")[: args.queries], data)
    from meav_merge.coefficients import parse_lambdas

    lambdas = parse_lambdas(args.lambdas, "--lambdas")  # finite numbers or a one-line error
    on_disk = [lambdas[round(i * (len(lambdas) - 1) / max(1, args.disk_points - 1))] for i in range(args.disk_points)]

    from meav_merge.evaluation.sweep import ReweightableModel, sweep
    from meav_merge.vectors.alignment_vector import AlignmentVector

    recs = load_records(data, "medical", None)
    # In memory, twice: re-running every layer, and reusing the frozen bottom layers'
    # states (possible when the vector changes only top layers, as CPU-preset ones do).
    per_point, first = {}, {}
    for reuse in (False, True):
        t = time.perf_counter()
        rm = ReweightableModel(model, [AlignmentVector.load(vector)], reuse_frozen_layers=reuse)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        sweep(rm, recs, lambdas[:1])
        first[reuse] = time.perf_counter() - t
        points = sweep(rm, recs, lambdas)  # the first point is cached: only the rest are scored
        per_point[reuse] = (time.perf_counter() - t) / len(lambdas)
        if reuse and rm.scorer is None:
            print("(the vector changes the bottom layers too: no frozen-layer reuse possible)")
        del rm
    mem_s, full_s = per_point[True], per_point[False]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    disk = []
    for lam in on_disk:
        t = time.perf_counter()
        recipe = work / f"r{lam}.yaml"
        out = work / f"m{lam}"
        recipe.write_text(yaml.safe_dump({"merge_method": "meav", "base_model": str(model),
                                          "models": [{"model": str(vector), "parameters": {"lambda": lam}}]}))
        subprocess.run([str(Path(sys.executable).with_name("mergekit-yaml")), str(recipe), str(out)], check=True,
                       env=env, capture_output=True)
        res = work / f"res{lam}"
        subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
                        f"pretrained={out},dtype=float32", "--tasks", "meav_pref_medical", "--device", "cpu",
                        "--batch_size", "4", "--metadata", json.dumps({"data_file": str(data), "split": "all"}),
                        "--output_path", str(res)], check=True, env=env, capture_output=True)
        disk.append(time.perf_counter() - t)
        got = json.loads(sorted(res.rglob("results_*.json"))[-1].read_text())["results"]["meav_pref_medical"]
        want = points[lambdas.index(lam)].fractions
        assert abs(got["pref_acc_exp,none"] - want["expert"]) < 1e-9, (got, want)
    disk_s = sum(disk) / len(disk)
    print(f"{len(recs)} queries, in-memory λ ∈ {lambdas}, merge + reload + lm-eval at {on_disk}")
    print(f"meav sweep, frozen layers reused: {mem_s:7.1f} s per λ point (+ {load_s:.1f} s once to load; "
          f"the first point, which computes the trunk states, {first[True]:.1f} s, the others "
          f"{(mem_s * len(lambdas) - first[True]) / max(1, len(lambdas) - 1):.1f} s)")
    print(f"meav sweep, every layer each point: {full_s:7.1f} s per λ point")
    print(f"merge + reload + lm-eval:          {disk_s:7.1f} s per λ point")
    print(f"ratios: in-memory sweep is {disk_s / mem_s:.1f}x faster per point than merge+reload+lm-eval "
          f"({disk_s / full_s:.1f}x without frozen-layer reuse; reuse alone {full_s / mem_s:.1f}x); same fractions, checked")


if __name__ == "__main__":
    main()
