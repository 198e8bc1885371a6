#!/usr/bin/env python3
"""Raw onnxruntime (Python, CPU) throughput on a bundle's ONNX model: the floor
that Nightingale's per-request overhead is measured against.

For each batch size: warm up, then time N single `session.run` calls and report
requests/s, rows/s and p50/p99 latency. Prints one JSON document.

  .venv/bin/python benches/load/ort_baseline.py
  .venv/bin/python benches/load/ort_baseline.py --threads 4 --batch 1 64 256 --iterations 20000
  .venv/bin/python benches/load/ort_baseline.py --model models/bench/resnet50-arch/1/model.onnx \\
      --batch 1 8 64 --iterations 20 --warmup 2

The model's first input is fed; its row shape and datatype come from the model's
input metadata. A tabular input [N, F] takes rows from --csv when that file exists;
any other input gets random N(0,1) rows (seed 0).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "bundles" / "wdbc-malignancy" / "1" / "model.onnx"
DEFAULT_CSV = REPO / "models" / "bundles" / "wdbc-malignancy" / "testdata" / "test.csv"


ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def load_rows(csv_path: Path, n_features: int) -> np.ndarray:
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return np.array([[float(v) for v in r[:n_features]] for r in reader], dtype=np.float32)


def percentile_us(lat_s: np.ndarray, q: float) -> float:
    return float(np.percentile(lat_s, q) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV,
                    help="rows to feed a tabular [N, F] input (first F columns); random if missing")
    ap.add_argument("--threads", type=int, default=1, help="intra_op_num_threads (default 1)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--iterations", type=int, nargs="+", default=[10000],
                    help="timed calls per batch size: one number, or one per --batch")
    ap.add_argument("--warmup", type=int, default=500)
    args = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(args.model), sess_options=so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    row_shape = [int(d) for d in inp.shape[1:]]  # a symbolic non-batch dimension fails here, as it should
    dtype = ORT_DTYPES[inp.type]
    out_names = [o.name for o in sess.get_outputs()]
    if len(args.iterations) not in (1, len(args.batch)):
        ap.error("--iterations takes one number or one per --batch")
    iterations = args.iterations * len(args.batch) if len(args.iterations) == 1 else args.iterations

    if len(row_shape) == 1 and args.csv and args.csv.exists():
        pool = load_rows(args.csv, row_shape[0]).astype(dtype)
    else:
        n_rows = 256 if int(np.prod(row_shape)) <= 4096 else max(args.batch)
        pool = np.random.default_rng(0).standard_normal([n_rows] + row_shape).astype(dtype)

    results = []
    for batch, n_iter in zip(args.batch, iterations):
        x = np.ascontiguousarray(pool[np.arange(batch) % len(pool)])
        feed = {inp.name: x}
        for _ in range(args.warmup):
            sess.run(out_names, feed)
        lat = np.empty(n_iter, dtype=np.float64)
        t_start = time.perf_counter()
        for i in range(n_iter):
            t0 = time.perf_counter()
            sess.run(out_names, feed)
            lat[i] = time.perf_counter() - t0
        elapsed = time.perf_counter() - t_start
        results.append(
            {
                "batch": batch,
                "iterations": n_iter,
                "seconds": elapsed,
                "requests_per_s": n_iter / elapsed,
                "rows_per_s": n_iter * batch / elapsed,
                "latency_us": {
                    "mean": float(lat.mean() * 1e6),
                    "p50": percentile_us(lat, 50),
                    "p99": percentile_us(lat, 99),
                    "max": float(lat.max() * 1e6),
                },
            }
        )

    print(
        json.dumps(
            {
                "tool": "ort_baseline",
                "model": str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model),
                "onnxruntime": ort.__version__,
                "provider": "CPUExecutionProvider",
                "intra_op_num_threads": args.threads,
                "warmup": args.warmup,
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
