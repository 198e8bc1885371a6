#!/usr/bin/env python3
"""Bounded closed-loop load against a running KServe v2 server (Nightingale or
Triton) with Triton's own HTTP client: `concurrency` threads, each with its own
client, send back-to-back requests of `batch` rows for `duration` seconds.
Prints one JSON document with requests/s, rows/s and p50/p99 latency.

(perf_analyzer does not run on this project's machines; this is the stand-in.)

  .venv/bin/python benches/load/triton_load.py 127.0.0.1:8000 wdbc-malignancy \\
      --batch 1 --concurrency 16 --duration 10 --binary
  # the same over gRPC with tritonclient.grpc (metadata still read over HTTP):
  .venv/bin/python benches/load/triton_load.py 127.0.0.1:8000 wdbc-malignancy \\
      --grpc 127.0.0.1:8001 --outputs probabilities --concurrency 16

With --requests N the load is bounded by count instead of time (for slow models):
each connection sends --warmup-requests unmeasured requests, then all start together
and each sends exactly N; the rate is all answered requests over the time from that
common start to the last answer.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

REPO = Path(__file__).resolve().parents[2]


def make_pool(md: dict, model: str, csv_path: Path | None, rows: int = 256) -> tuple[str, str, np.ndarray]:
    """(input name, datatype, a pool of rows) for a single-input model."""
    if len(md["inputs"]) != 1:
        raise SystemExit(f"{model}: only single-input models are supported, got {md['inputs']}")
    tin = md["inputs"][0]
    shape = [int(d) for d in tin["shape"]]
    if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
        raise SystemExit(f"{model}: expected input shape [-1, ...fixed], got {shape}")
    row_shape = shape[1:]
    dtype = triton_to_np_dtype(tin["datatype"])
    if csv_path is None:
        default = REPO / "models" / "bundles" / model / "testdata" / "test.csv"
        csv_path = default if default.exists() else None
    if csv_path is not None and len(row_shape) == 1:
        with open(csv_path, newline="") as f:
            reader = csv.reader(f)
            next(reader)
            pool = np.array([[float(v) for v in r[: row_shape[0]]] for r in reader], dtype=dtype)
    else:
        rng = np.random.default_rng(0)
        pool = rng.standard_normal([rows] + row_shape).astype(dtype)
    return tin["name"], tin["datatype"], pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="host:port of the server's HTTP endpoint")
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds (after warm-up)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds, not measured")
    ap.add_argument("--binary", action="store_true", help="binary tensor extension for inputs and outputs")
    ap.add_argument("--csv", type=Path, default=None, help="rows to send (first F columns)")
    ap.add_argument("--requests", type=int, default=0,
                    help="bound by count instead of --duration: measured requests per connection")
    ap.add_argument("--warmup-requests", type=int, default=1,
                    help="with --requests: unmeasured requests per connection before the start")
    ap.add_argument("--grpc", metavar="HOST:PORT", default=None,
                    help="send the infers with tritonclient.grpc to this gRPC endpoint (raw "
                         "contents, as tritonclient.grpc sends them) instead of over HTTP")
    ap.add_argument("--outputs", default=None,
                    help="comma-separated outputs to ask for (default: all of the model's)")
    args = ap.parse_args()

    probe = httpclient.InferenceServerClient(url=args.url)
    if not probe.is_model_ready(args.model):
        raise SystemExit(f"model {args.model} is not ready at {args.url}")
    md = probe.get_model_metadata(args.model)
    out_names = args.outputs.split(",") if args.outputs else [o["name"] for o in md["outputs"]]
    server_md = probe.get_server_metadata()
    probe.close()
    # Large rows (images): a pool just big enough that no two connections send the same rows.
    row_elems = int(np.prod([int(d) for d in md["inputs"][0]["shape"][1:]] or [1]))
    pool_rows = 256 if row_elems <= 4096 else max(1, min(256, args.batch * args.concurrency))
    in_name, datatype, pool = make_pool(md, args.model, args.csv, pool_rows)

    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    n_errors = 0
    start_barrier = threading.Barrier(args.concurrency + 1)
    t_measure = [0.0, 0.0]  # start, end of the measured window
    spans: list[tuple[float, float]] = []  # with --requests: each connection's (start, last answer)

    def worker(w: int) -> None:
        nonlocal n_errors
        idx = (w * args.batch + np.arange(args.batch)) % len(pool)
        x = np.ascontiguousarray(pool[idx])
        if args.grpc:
            c = grpcclient.InferenceServerClient(url=args.grpc)
            inp = grpcclient.InferInput(in_name, list(x.shape), datatype)
            inp.set_data_from_numpy(x)
            outs = [grpcclient.InferRequestedOutput(n) for n in out_names]
            bound = {"client_timeout": 120.0}  # as the HTTP client's network_timeout
        else:
            c = httpclient.InferenceServerClient(url=args.url, network_timeout=120.0)
            inp = httpclient.InferInput(in_name, list(x.shape), datatype)
            inp.set_data_from_numpy(x, binary_data=args.binary)
            outs = [httpclient.InferRequestedOutput(n, binary_data=args.binary) for n in out_names]
            bound = {}
        mine: list[float] = []
        my_errors = 0
        first_error = None
        if args.requests:
            for _ in range(args.warmup_requests):
                try:
                    c.infer(args.model, [inp], outputs=outs, **bound)
                except InferenceServerException as e:
                    first_error = first_error or f"warm-up: {e}"
            start_barrier.wait()
            t_first = time.perf_counter()
            try:
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    try:
                        c.infer(args.model, [inp], outputs=outs, **bound)
                    except InferenceServerException as e:
                        my_errors += 1
                        first_error = first_error or str(e)
                        continue
                    mine.append(time.perf_counter() - t0)
                t_last = time.perf_counter()
            finally:
                c.close()
            with lock:
                spans.append((t_first, t_last))
                latencies.extend(mine)
                n_errors += my_errors
                if first_error:
                    errors.append(first_error)
            return
        start_barrier.wait()
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_measure[1]:
                    break
                try:
                    c.infer(args.model, [inp], outputs=outs, **bound)
                except InferenceServerException as e:
                    if t0 >= t_measure[0]:
                        my_errors += 1
                        first_error = first_error or str(e)
                    continue
                t1 = time.perf_counter()
                # Count a request in the window if it started inside it.
                if t0 >= t_measure[0]:
                    mine.append(t1 - t0)
        finally:
            c.close()
        with lock:
            latencies.extend(mine)
            n_errors += my_errors
            if first_error:
                errors.append(first_error)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(args.concurrency)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    t_measure[0] = now + args.warmup
    t_measure[1] = t_measure[0] + args.duration
    start_barrier.wait()
    for t in threads:
        t.join()
    # Requests that began in the window may finish after it; rate uses the window plus that tail.
    window = args.duration
    if args.requests:
        window = max(e for _, e in spans) - min(s for s, _ in spans)
    lat = np.array(latencies, dtype=np.float64)
    n = len(lat)

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q) * 1e3) if n else None

    print(
        json.dumps(
            {
                "tool": "triton_load",
                "url": args.url,
                "server": {k: server_md.get(k) for k in ("name", "version")},
                "model": args.model,
                "batch": args.batch,
                "concurrency": args.concurrency,
                "binary": args.binary,
                "protocol": "grpc" if args.grpc else "http",
                "outputs": out_names,
                "warmup_s": None if args.requests else args.warmup,
                "warmup_requests": args.warmup_requests if args.requests else None,
                "requests_per_connection": args.requests or None,
                "duration_s": window,
                "requests": n,
                "errors": n_errors,
                "first_errors": errors[:3],
                "requests_per_s": n / window,
                "rows_per_s": n * args.batch / window,
                "latency_ms": {
                    "mean": float(lat.mean() * 1e3) if n else None,
                    "p50": pct(50),
                    "p90": pct(90),
                    "p99": pct(99),
                    "max": float(lat.max() * 1e3) if n else None,
                },
                "client_cpu_count": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
