"""Shared helpers for the benchmark scripts: run a command in a child process and
measure its wall time and peak RSS (per child, via wait4), and make test inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from meav_merge.resources import DEFAULT_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / DEFAULT_MODEL_DIR


def run_measured(cmd, env=None) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def scratch(prefix: str) -> Path:
    """A temporary folder removed when the script exits: a merge bench run writes ~30 merged
    135M models, and leaving them filled /tmp (26 GB per run of bench/merge.py)."""
    import atexit
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def ensure_model() -> Path:
    if not (MODEL / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "meav_merge.cli.main", "base", "--out", str(MODEL)], check=True)
    return MODEL


def perturbed_copy(src: Path, dst: Path, scale: float = 1e-3, seed: int = 0, top_layers: int = 0) -> Path:
    """A stand-in 'aligned' checkpoint: the base plus small noise in every tensor, or with
    ``top_layers`` only in the top layers and the final norm (what the CPU preset trains)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    if (dst / "model.safetensors").is_file():
        return dst
    shutil.copytree(src, dst, dirs_exist_ok=True)
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    n = max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")) + 1
    top = tuple(f"model.layers.{i}." for i in range(n - top_layers, n)) + ("model.norm.",)
    sd = {k: v + scale * torch.randn(v.shape, generator=g) if not top_layers or k.startswith(top) else v
          for k, v in sd.items()}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]
