"""`meav serve` under load, in one run (embedded SmolLM2-135M-Instruct, loopback):

1. storage: sparse vector and compressed vector sizes vs the base model;
2. throughput of lm-eval-style scoring requests (echo + logprobs, max_tokens 1) at mixed
   random settings vs at one fixed setting (the server then never switches: a static
   merged model served by the same code);
3. latency added by switching settings (engine swap time, and client latency of
   alternating vs repeated settings);
4. a bounded load test: N clients x M requests at random settings, each answer checked
   against an in-process reference at its setting; lost and wrong answers counted.

Vectors: given ones (--vector NAME=DIR), else vectors extracted from copies of the base
with the top 4 layers perturbed (what `meav train --preset cpu` changes).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import ensure_model  # noqa: E402

PROMPTS = [
    "<|im_start|>user\nMy blood pressure is 150/95 at 52. What should I do?<|im_end|>\n<|im_start|>assistant\n"
    "Confirm with home readings over a week, then discuss lifestyle changes and medication with your doctor.",
    "<|im_start|>user\nMy landlord kept my deposit after I moved out. Can I get it back?<|im_end|>\n"
    "<|im_start|>assistant\nSend a written demand citing your state's deposit statute; small claims court is next.",
    "<|im_start|>user\nShould I pay off my car loan early or invest?<|im_end|>\n<|im_start|>assistant\n"
    "Compare the loan's rate with the after-tax return you expect; above about 6% paying it off usually wins.",
    "<|im_start|>user\nIs a resting heart rate of 48 a problem for a runner?<|im_end|>\n<|im_start|>assistant\n"
    "In trained runners 40-60 bpm is usually normal unless you faint or feel dizzy.",
]


def top_layer_vectors(base: Path, work: Path, names, layers: int = 4) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from meav_merge.vectors.alignment_vector import extract_vector

    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    top = tuple(f"model.layers.{i}." for i in range(n_layers - layers, n_layers))
    out = {}
    for seed, name in enumerate(names):
        vdir = work / f"vec_{name}"
        if not (vdir / "meav_vector.json").is_file():
            aligned = work / f"aligned_{name}"
            shutil.copytree(base, aligned, dirs_exist_ok=True)
            sd = load_file(str(base / "model.safetensors"))
            g = torch.Generator().manual_seed(seed)
            for k in sd:
                if k.startswith(top):
                    sd[k] = sd[k] + 2e-3 * torch.randn(sd[k].shape, generator=g).to(sd[k].dtype)
            save_file(sd, str(aligned / "model.safetensors"), metadata={"format": "pt"})
            extract_vector(aligned, base, vdir)
            shutil.rmtree(aligned)
        out[name] = vdir
    return out


def sizes(base: Path, vectors: dict, work: Path, rank: int) -> dict:
    from meav_merge.vectors.compress import compress_vector, vector_bytes

    name, vdir = next(iter(vectors.items()))
    cdir = work / f"vec_{name}_r{rank}"
    if not cdir.is_dir():
        compress_vector(vdir, cdir, rank=rank)
    b, v, c = vector_bytes(base), vector_bytes(vdir), vector_bytes(cdir)
    return {"base_MB": b / 1e6, "sparse_MB": v / 1e6, "sparse_share": v / b, "rank": rank,
            "compressed_MB": c / 1e6, "compressed_share": c / b}


def references(base: Path, vectors: dict, settings: list) -> dict:
    """Echo log-probs of every prompt at every setting, computed in process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meav_merge.vectors.alignment_vector import AlignmentVector, apply_vectors

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    loaded = {n: AlignmentVector.load(p) for n, p in vectors.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for s in settings:
        model.load_state_dict(state)
        apply_vectors(model, [(loaded[n], lam) for n, lam in s])
        for i, text in enumerate(PROMPTS):
            ids = tok(text, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
            out[(model_name(s), i)] = [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
    return out


def model_name(setting) -> str:
    return "base+" + ",".join(f"{n}={lam:g}" for n, lam in setting) if setting else "base"


def drive(url: str, jobs: list, clients: int, refs=None) -> dict:
    """Run (model, prompt index) jobs from ``clients`` threads; count lost/wrong answers."""
    from openai import OpenAI

    queue = list(jobs)
    lock = threading.Lock()
    stats = {"ok": 0, "lost": 0, "wrong": 0, "latency": []}

    def worker():
        c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        while True:
            with lock:
                if not queue:
                    return
                model, i = queue.pop()
            t0 = time.perf_counter()
            try:
                r = c.completions.create(model=model, prompt=PROMPTS[i], max_tokens=1, echo=True, logprobs=1,
                                         temperature=0)
                lp = r.choices[0].logprobs.token_logprobs[1:-1]
            except Exception:  # noqa: BLE001 - a lost request is what this counts
                with lock:
                    stats["lost"] += 1
                continue
            dt = time.perf_counter() - t0
            bad = refs is not None and (len(lp) != len(refs[(model, i)]) or
                                        max(abs(a - b) for a, b in zip(lp, refs[(model, i)])) > 1e-3)
            with lock:
                stats["wrong" if bad else "ok"] += 1
                stats["latency"].append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["seconds"] = time.perf_counter() - t0
    stats["req_per_s"] = len(jobs) / stats["seconds"]
    lat = stats.pop("latency")
    stats["median_latency_s"] = statistics.median(lat) if lat else None
    return stats


def switch_latency(url: str, settings: list, rounds: int) -> dict:
    """Sequential single requests: same setting every time vs a different one every time."""
    from openai import OpenAI

    c = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)

    def one(model):
        t0 = time.perf_counter()
        c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=1, echo=True, logprobs=1, temperature=0)
        return time.perf_counter() - t0

    one(model_name(settings[0]))
    same = statistics.median(one(model_name(settings[0])) for _ in range(rounds))
    alt = statistics.median(one(model_name(settings[k % 2])) for k in range(rounds))
    return {"same_setting_ms": same * 1e3, "alternating_ms": alt * 1e3, "added_ms": (alt - same) * 1e3}


def engine_swap_ms(base: Path, vectors: dict, settings: list) -> float:
    from meav_merge.serving.engine import Engine

    eng = Engine(str(base), {n: str(p) for n, p in vectors.items()})
    t0 = time.perf_counter()
    for k in range(20):
        eng.set_setting(settings[k % len(settings)])
    return (time.perf_counter() - t0) / 20 * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vector", action="append", metavar="NAME=DIR")
    ap.add_argument("--work", default="runs/bench/serve", help="scratch vectors and report (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="requests per client (M)")
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args(argv)
    from test_serve import start_server

    base = ensure_model()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.vector:
        vectors = dict(s.split("=", 1) for s in args.vector)
    else:
        vectors = top_layer_vectors(base, work, ["medical", "financial", "legal"])
    names = sorted(vectors)
    rng = random.Random(0)
    settings = [tuple(sorted((n, lam) for n, lam in zip(names, combo) if lam != 0))
                for combo in [(1, 0, 0), (-1, 0, 0), (0, 0.6, 0), (0.5, -0.5, 1), (0, 0, -1), (2, 1, 0)][: 6]]
    report = {"sizes": sizes(base, vectors, work, args.rank)}
    print(json.dumps(report["sizes"]), flush=True)
    report["engine_swap_ms"] = engine_swap_ms(base, vectors, settings)
    refs = references(base, vectors, settings)
    proc, url = start_server(["--model", str(base), *[f"--vector={n}={p}" for n, p in vectors.items()]],
                             work / "server.log")
    try:
        n = args.clients * args.requests
        static = [(model_name(settings[0]), k % len(PROMPTS)) for k in range(n)]
        mixed = [(model_name(rng.choice(settings)), k % len(PROMPTS)) for k in range(n)]
        drive(url, static[: args.clients * 2], args.clients)  # warm-up
        report["static"] = drive(url, static, args.clients, refs)
        report["mixed"] = drive(url, mixed, args.clients, refs)
        report["mixed_over_static"] = report["mixed"]["req_per_s"] / report["static"]["req_per_s"]
        report["switch"] = switch_latency(url, settings, 20)
        load = [(model_name(rng.choice(settings)), rng.randrange(len(PROMPTS))) for _ in range(n)]
        report["load_test"] = {"clients": args.clients, "requests_per_client": args.requests,
                               **drive(url, load, args.clients, refs)}
    finally:
        proc.terminate()
        proc.wait(60)
    print(json.dumps(report, indent=2))
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
