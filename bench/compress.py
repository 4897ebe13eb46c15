"""Compressed vectors against the uncompressed ones, and against mergekit-extract-lora, in one run.

For each trained domain vector: its stored size and its low-rank copies' sizes as a share
of the base model, and fidelity — the preference-accuracy fractions on the domain's test
split at each λ of its sweep, compressed minus uncompressed (the goal: every fraction
within 0.05). mergekit-extract-lora (the anchor: a truncated SVD of fine-tuned − base per
linear layer, written as a PEFT adapter) is run on the same aligned model at the same
rank; its adapter is folded back into a vector so it is scored the same way.

    .venv/bin/python bench/compress.py --run medical=runs/medical --run legal=runs/legal --ranks 16,64
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin"))


def sweep_fractions(model: str, vector: Path, domain: str, lambdas, limit: int) -> list:
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.sweep import ReweightableModel, sweep
    from meav_merge.vectors.alignment_vector import AlignmentVector

    rm = ReweightableModel(model, [AlignmentVector.load(vector)])
    points = sweep(rm, load_records("data", domain, "test")[:limit], lambdas, desc=f"{domain} {vector.name}")
    return [p.fractions for p in points]


def extract_lora_vector(model: str, aligned: Path, rank: int, work: Path) -> tuple:
    """mergekit-extract-lora at ``rank``; returns (adapter bytes, vector dir of its folded delta)."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from meav_merge.vectors.alignment_vector import extract_vector

    adapter = work / f"mergekit_lora_r{rank}"
    if adapter.exists():
        shutil.rmtree(adapter)
    exe = str(Path(sys.executable).with_name("mergekit-extract-lora"))
    # absolute paths: mergekit reads "models/x" (one slash) as a Hub id
    proc = subprocess.run([exe, "--model", str(Path(aligned).resolve()), "--base-model", str(Path(model).resolve()),
                           "--out-path", str(adapter),
                           "--max-rank", str(rank)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-extract-lora failed: {proc.stderr.strip().splitlines()[-1]}")
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    folded = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged_dir = work / f"mergekit_lora_r{rank}_merged"
    # merge_and_unload leaves the LM head untied (and tie_weights() does not re-tie it), so a
    # plain save adds lm_head.weight, which the base (tied to embed_tokens) does not have.
    # Keep exactly the base's tensor names; the tied head equals embed_tokens anyway.
    with safe_open(str(Path(model) / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    state = {k: v.contiguous() for k, v in folded.state_dict().items() if k in names}
    merged_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(Path(model) / "config.json", merged_dir / "config.json")
    vec = work / f"mergekit_lora_r{rank}_vector"
    if vec.exists():
        shutil.rmtree(vec)
    extract_vector(merged_dir, model, vec)
    shutil.rmtree(merged_dir)
    return dir_bytes(adapter), vec


def main(argv=None) -> None:
    from meav_merge.coefficients import lambdas_arg
    from meav_merge.vectors.compress import compress_vector

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--run", action="append", required=True, help="domain=RUN_DIR (holding aligned/ and vector/)")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--lambdas", type=lambdas_arg(), default=[-2.0, -1.0, 1.0, 2.0])
    ap.add_argument("--limit", type=int, default=32, help="test queries per domain")
    ap.add_argument("--work", default="runs/bench/compress")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit-extract-lora comparison")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_bytes = dir_bytes(Path(args.model))
    ranks = [int(r) for r in args.ranks.split(",")]
    report = {"base_bytes": base_bytes, "lambdas": args.lambdas, "limit": args.limit, "vectors": {}}
    for spec in args.run:
        domain, run = spec.split("=", 1)
        run = Path(run)
        dense = run / "vector"
        ref = sweep_fractions(args.model, dense, domain, args.lambdas, args.limit)
        entry = {"stored_bytes": dir_bytes(dense), "stored_share": dir_bytes(dense) / base_bytes, "dense": ref,
                 "lowrank": {}, "mergekit_extract_lora": {}}
        for r in ranks:
            out = work / f"{domain}_r{r}"
            started = time.time()
            compress_vector(dense, out, rank=r, force=True)
            got = sweep_fractions(args.model, out, domain, args.lambdas, args.limit)
            entry["lowrank"][r] = {"bytes": dir_bytes(out), "share": dir_bytes(out) / base_bytes,
                                   "seconds": round(time.time() - started, 1), "fractions": got,
                                   "max_abs_diff": max(abs(g[lv] - f[lv]) for g, f in zip(got, ref) for lv in f)}
            if not args.no_mergekit:
                size, vec = extract_lora_vector(args.model, run / "aligned", r, work / domain)
                mk = sweep_fractions(args.model, vec, domain, args.lambdas, args.limit)
                entry["mergekit_extract_lora"][r] = {
                    "adapter_bytes": size, "share": size / base_bytes, "fractions": mk,
                    "max_abs_diff": max(abs(g[lv] - f[lv]) for g, f in zip(mk, ref) for lv in f)}
        report["vectors"][domain] = entry
        print(json.dumps({domain: {k: v for k, v in entry.items() if k not in ("dense",)}}, indent=1, default=str))
    (work / "compress_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nbase {base_bytes / 1e6:.1f} MB; n = {args.limit} test queries per domain; λ = {args.lambdas}")
    for d, e in report["vectors"].items():
        line = f"{d}: stored {e['stored_share']:.1%}"
        for r, c in e["lowrank"].items():
            line += f"; rank {r}: {c['share']:.2%}, max |Δ fraction| {c['max_abs_diff']:.3f}"
            mk = e["mergekit_extract_lora"].get(r)
            if mk:
                line += f" (mergekit-extract-lora {mk['share']:.2%}, {mk['max_abs_diff']:.3f})"
        print(line)


if __name__ == "__main__":
    main()
