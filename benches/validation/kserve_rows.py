"""Scores a CSV of wdbc-malignancy rows through a running server's KServe v2 API (64-row
JSON requests, 4 concurrent connections, keep-alive) and prints rows/s. Not a test.

    python benches/validation/kserve_rows.py 127.0.0.1:8000 rows.csv
"""

from __future__ import annotations

import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

BATCH = 64
CONNECTIONS = 4


def main() -> None:
    addr, path = sys.argv[1], sys.argv[2]
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [[float(v) for v in r[:30]] for r in reader]
    assert header[30] == "label"
    bodies = [
        json.dumps({"inputs": [{"name": "features", "shape": [len(chunk), 30], "datatype": "FP32",
                                "data": [v for r in chunk for v in r]}]})
        for chunk in (rows[i:i + BATCH] for i in range(0, len(rows), BATCH))
    ]
    url = f"http://{addr}/v2/models/wdbc-malignancy/versions/1/infer"
    sessions = [requests.Session() for _ in range(CONNECTIONS)]

    def send(k: int) -> None:
        r = sessions[k % CONNECTIONS].post(url, data=bodies[k], timeout=60)
        r.raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(CONNECTIONS) as pool:
        list(pool.map(send, range(len(bodies))))
    secs = time.perf_counter() - start
    print(f"KSERVE rows={len(rows)} seconds={secs:.3f} rows_per_s={len(rows) / secs:.0f} "
          f"(JSON, {BATCH}-row requests, {CONNECTIONS} connections, Python requests client)")


if __name__ == "__main__":
    main()
