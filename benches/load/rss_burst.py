"""Peak resident memory of a Nightingale server under a burst of large JSON bodies.

Starts BIN (`serve` on wdbc-malignancy, plus any extra flags), sends one ordinary request,
reads the server's VmRSS (baseline), then has CLIENTS threads each POST the same
BODY_MIB MiB JSON body at once (Content-Length and `Expect: 100-continue`, as curl sends
large bodies), and reads the server's VmHWM (peak RSS) from /proc when all have answered.
Prints the statuses and the figures as one JSON line.

    .venv/bin/python benches/load/rss_burst.py target/debug/nightingale \
        [--clients 32] [--body-mib 48] [-- extra serve flags]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = "wdbc-malignancy"


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def exchange(addr: tuple[str, int], body: bytes, timeout: float = 300) -> int:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        f = s.makefile("rb")
        status = int(f.readline().split()[1])
        while f.readline() not in (b"\r\n", b""):
            pass
        if status == 100:
            s.sendall(body)
            status = int(f.readline().split()[1])
        f.read()  # headers and body, until the server closes
        return status


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--body-mib", type=int, default=48)
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()

    with open(REPO / "models/bundles" / MODEL / "testdata/test.csv") as f:
        rows = [[float(v) for v in r[:30]] for r in list(csv.reader(f))[1:]]
    target = args.body_mib << 20
    parts, size, n = [], 0, 0
    while size < target - 200:
        p = json.dumps(rows[n % len(rows)])
        parts.append(p)
        size += len(p) + 1
        n += 1
    body = ('{"inputs":[{"name":"features","datatype":"FP32","shape":[%d,30],"data":[%s]}]}' % (n, ",".join(parts))).encode()
    small = json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 30], "data": rows[0]}]}).encode()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    cmd = [args.bin, "serve", "--repository", str(REPO / "models/bundles"), "--http-addr", f"127.0.0.1:{port}",
           "--audit-log", f"{tmp}/audit.jsonl", *args.extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env={"NIGHTINGALE_LOG": "warn", "PATH": "/usr/bin:/bin"})
    try:
        addr = ("127.0.0.1", port)
        deadline = time.monotonic() + 120
        while True:
            try:
                if exchange(addr, small, timeout=5) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("server did not come up")
            time.sleep(0.2)
        baseline = proc_kib(proc.pid, "VmRSS:")
        statuses: collections.Counter = collections.Counter()
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients)

        def client() -> None:
            barrier.wait()
            try:
                st = str(exchange(addr, body))
            except OSError as e:
                st = type(e).__name__
            with lock:
                statuses[st] += 1

        start = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        peak = proc_kib(proc.pid, "VmHWM:")
        print(json.dumps({
            "bin": args.bin, "extra": args.extra, "clients": args.clients, "body_bytes": len(body), "rows": n,
            "statuses": dict(statuses), "baseline_rss_mib": round(baseline / 1024, 1),
            "peak_rss_mib": round(peak / 1024, 1), "wall_s": round(wall, 2),
        }))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
