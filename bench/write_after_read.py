"""Why bench/merge.py has two I/O floors: on this machine, writing out a memory-mapped file is
slower when its pages were read before the write than when the write itself pages them in.

No torch, safetensors or mergekit: the file is mapped with mmap, optionally read once (a sum, as a
merge reads each tensor), then written to a new file in write() calls of a given size, after
os.sync(). Each case runs in its own process. The kernel copies a source that is already mapped into
large page-cache folios, one whose pages fault mid-copy into 4 KiB ones (it halves its chunk on a
short copy), and on this machine (Linux 6.18, ext4, a Firecracker guest) allocating the large ones
is what is slow; the chunk rows show the write size alone deciding it.

Usage: .venv/bin/python bench/write_after_read.py [--file F] [--repeats 3]
(default F: the embedded model's model.safetensors; the effect grows with the file's size)
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))
from _common import ensure_model, scratch  # noqa: E402

ONE_CASE = """
import mmap, os, sys, time
import numpy as np
src, dst, read_first, chunk = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
size = os.path.getsize(src)
fd = os.open(src, os.O_RDONLY)
m = mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_PRIVATE)
if read_first:
    np.frombuffer(m, dtype=np.float32, count=size // 4).sum()
os.sync()
started = time.perf_counter()
out, view = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), memoryview(m)
for i in range(0, size, chunk):
    os.write(out, view[i:i + chunk])
os.close(out)
print(time.perf_counter() - started)
"""

CASES = [  # (label, read first, write() size)
    ("paged in by the write, 256 MiB writes", False, 256 << 20),
    ("read first, 256 MiB writes", True, 256 << 20),
    ("read first, 64 KiB writes", True, 64 << 10),
    ("read first, 16 KiB writes", True, 16 << 10),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", type=Path, help="a large file to copy (default: the embedded model's weights)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = args.file or ensure_model() / "model.safetensors"
    dst = scratch("meav-bench-write-") / "copy"
    seconds = {label: [] for label, *_ in CASES}
    for _ in range(args.repeats):
        for label, read_first, chunk in CASES:
            out = subprocess.run([sys.executable, "-c", ONE_CASE, str(src), str(dst), str(int(read_first)), str(chunk)],
                                 check=True, capture_output=True, text=True)
            seconds[label].append(float(out.stdout.strip()))
            dst.unlink()
    size_gb = src.stat().st_size / 1e9
    base = median(seconds[CASES[0][0]])
    print(f"{src} ({size_gb:.2f} GB), medians of {args.repeats}, kernel {os.uname().release}")
    for label, times in seconds.items():
        t = median(times)
        print(f"{label:<40} {t:6.2f} s  {size_gb / t:5.2f} GB/s  {t / base:5.2f}x  ({', '.join(f'{x:.2f}' for x in times)})")


if __name__ == "__main__":
    main()
