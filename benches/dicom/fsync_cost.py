#!/usr/bin/env python3
"""What one durable store costs the file system: write a 512 KB file to a temporary folder,
fsync it, rename it into another folder, fsync that folder (the spool's sequence for one
instance, see dicom/src/spool.rs). Prints the median and the 10th/90th percentiles of N runs.

    python3 benches/dicom/fsync_cost.py [DIR] [--runs N] [--size BYTES]

DIR must be on the file system under test (default: a fresh folder under target/, the disk
the benchmark's spool uses). Not a test: a measurement for docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--size", type=int, default=512 * 1024)
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(__file__).resolve().parents[2] / "target"
    base.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(args.size)
    times = []
    with tempfile.TemporaryDirectory(dir=base, prefix="fsync-cost-") as root:
        tmp = Path(root) / "tmp"
        dest = Path(root) / "instances"
        tmp.mkdir()
        dest.mkdir()
        for i in range(args.runs):
            t0 = time.perf_counter()
            part = tmp / f"{i}.part"
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(part, dest / f"{i}.dcm")
            dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    q = statistics.quantiles(times, n=10)
    print(
        f"write+fsync+rename+dir fsync of {args.size} bytes on {base}: "
        f"median {statistics.median(times):.2f} ms, p10 {q[0]:.2f} ms, p90 {q[-1]:.2f} ms "
        f"({args.runs} runs)"
    )


if __name__ == "__main__":
    main()
