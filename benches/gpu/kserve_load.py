#!/usr/bin/env python3
"""Closed-loop load on a KServe v2 server with the standard library only (the GPU machine
has no tritonclient and reaches no registry): `concurrency` threads, each with its own
keep-alive connection, send back-to-back binary-tensor requests (KServe's binary data
extension, as tritonclient sends them) of `batch` rows for `seconds`. First checks one
answer against ONNX Runtime's CPU output for the same rows (the .npz of ort_raw.py).
Prints one JSON line: requests/s, rows/s, p50/p99 latency, errors, max difference.

    python3 benches/gpu/kserve_load.py 127.0.0.1:8000 resnet50-arch REF.npz \\
        --input image --output probabilities --batch 8 --concurrency 4 --seconds 3
"""

import argparse
import http.client
import json
import threading
import time

import numpy as np


def request(x: np.ndarray, input_name: str, output_name: str) -> tuple[bytes, dict]:
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }).encode()
    return header + x.tobytes(), {"Content-Type": "application/octet-stream",
                                  "Inference-Header-Content-Length": str(len(header))}


def infer(conn: http.client.HTTPConnection, model: str, body: bytes, headers: dict) -> np.ndarray:
    conn.request("POST", f"/v2/models/{model}/infer", body, headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
    n = int(resp.getheader("Inference-Header-Content-Length"))
    meta = json.loads(data[:n])
    out = meta["outputs"][0]
    return np.frombuffer(data[n:], dtype=np.float32).reshape(out["shape"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("model")
    p.add_argument("reference")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    host, port = a.url.split(":")
    ref = np.load(a.reference)
    x, y = ref["x"][: a.batch], ref["y"][: a.batch]
    if str(ref["output"]) != a.output:
        raise SystemExit(f"the reference holds {ref['output']}, not {a.output}")
    body, headers = request(np.ascontiguousarray(x), a.input, a.output)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    got = infer(conn, a.model, body, headers)
    max_diff = float(np.max(np.abs(got - y)))
    conn.close()

    lat: list[list[float]] = [[] for _ in range(a.concurrency)]
    errors = [0] * a.concurrency
    start = threading.Barrier(a.concurrency + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        infer(c, a.model, body, headers)  # warm-up, unmeasured
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t = time.perf_counter()
            try:
                infer(c, a.model, body, headers)
                lat[i].append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - counted, reported
                errors[i] += 1
                c.close()
                c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + a.seconds
    for t in threads:
        t.join(timeout=a.seconds + 120)
    elapsed = time.perf_counter() - t0
    all_lat = np.array([v for l in lat for v in l]) * 1e3
    n = len(all_lat)
    print(json.dumps({"model": a.model, "batch": a.batch, "concurrency": a.concurrency,
                      "requests": n, "errors": sum(errors), "requests_per_s": n / elapsed,
                      "rows_per_s": n * a.batch / elapsed,
                      "p50_ms": float(np.percentile(all_lat, 50)) if n else None,
                      "p99_ms": float(np.percentile(all_lat, 99)) if n else None,
                      "max_abs_diff_vs_cpu_onnxruntime": max_diff}), flush=True)


if __name__ == "__main__":
    main()
