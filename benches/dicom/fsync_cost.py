#!/usr/bin/env python3
"""What one durable store costs the file system, in the two orders the spool has used
(see dicom/src/spool.rs), interleaved run by run on the same disk:

- "serial" (before 2026-12-02): write a 512 KB file to a temporary folder, fsync it, rename
  it into another folder, fsync that folder: two device flushes one after the other;
- "parallel" (2026-12-02, now): write the file, link it into the other folder, then fsync
  the file and the folder at the same time (two threads), so that one flush can cover both;
- "journal" (a 2026-12-03 experiment, not shipped: docs/performance.md §8.6): write the
  file through the page cache and link it (no fsync), then write a record of it with
  O_DIRECT over blocks of a journal file written once before, and fdatasync the journal: one
  device write and one flush (what one store alone would pay; concurrent stores would share
  the flush).

Prints the median and the 10th/90th percentiles of N runs of each.

    python3 benches/dicom/fsync_cost.py [DIR] [--runs N] [--size BYTES]

DIR must be on the file system under test (default: a fresh folder under target/, the disk
the benchmark's spool uses). Not a test: a measurement for docs/performance.md.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def serial(tmp: Path, dest: Path, i: int, payload: bytes) -> float:
    t0 = time.perf_counter()
    part = tmp / f"{i}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(part, dest / f"{i}.dcm")
    fsync_path(dest)
    return (time.perf_counter() - t0) * 1000.0


def parallel(tmp: Path, dest: Path, i: int, payload: bytes) -> float:
    t0 = time.perf_counter()
    part = tmp / f"{i}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, payload)
        os.link(part, dest / f"{i}.dcm")
        os.unlink(part)
        folder = threading.Thread(target=fsync_path, args=(dest,))
        folder.start()
        os.fsync(fd)
        folder.join()
    finally:
        os.close(fd)
    return (time.perf_counter() - t0) * 1000.0


class Journal:
    """A journal file of 64 slots, written once (zeros) and fsynced, as the spool's segments."""

    SLOTS = 64

    def __init__(self, root: Path, size: int):
        self.slot = (size + 4096 + 4095) // 4096 * 4096
        self.buf = mmap.mmap(-1, self.slot)  # page-aligned, as O_DIRECT needs
        self.buf.write(os.urandom(self.slot))
        self.fd = os.open(root / "journal.wal", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        zeros = mmap.mmap(-1, self.slot)
        for k in range(self.SLOTS):
            os.pwrite(self.fd, zeros, k * self.slot)
        os.fsync(self.fd)


def journal(j: Journal, dest: Path, i: int, payload: bytes) -> float:
    t0 = time.perf_counter()
    fd = os.open(dest / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)
    os.pwrite(j.fd, j.buf, (i % Journal.SLOTS) * j.slot)
    os.fdatasync(j.fd)
    return (time.perf_counter() - t0) * 1000.0


def summary(name: str, times: list[float]) -> str:
    q = statistics.quantiles(sorted(times), n=10)
    return f"{name}: median {statistics.median(times):.2f} ms, p10 {q[0]:.2f} ms, p90 {q[-1]:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="?", default=None)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--size", type=int, default=512 * 1024)
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(__file__).resolve().parents[2] / "target"
    base.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(args.size)
    times: dict[str, list[float]] = {"serial": [], "parallel": [], "journal": []}
    with tempfile.TemporaryDirectory(dir=base, prefix="fsync-cost-") as root:
        tmp = Path(root) / "tmp"
        dest = Path(root) / "instances"
        tmp.mkdir()
        dest.mkdir()
        j = Journal(Path(root), args.size)
        for i in range(args.runs):
            times["serial"].append(serial(tmp, dest, 3 * i, payload))
            times["parallel"].append(parallel(tmp, dest, 3 * i + 1, payload))
            times["journal"].append(journal(j, dest, 3 * i + 2, payload))
        os.close(j.fd)
    print(f"durable store of {args.size} bytes on {base}, {args.runs} runs each, interleaved:")
    print("  " + summary("write, fsync, rename, folder fsync (serial)", times["serial"]))
    print("  " + summary("write, link, file and folder fsync together (parallel)", times["parallel"]))
    print("  " + summary("write and link, journal record + fdatasync (journal)", times["journal"]))


if __name__ == "__main__":
    main()
