#!/usr/bin/env python3
"""Writes KServe v2 request bodies for the load test from the wdbc test split:
json-<b>.json (JSON tensors; json-<b>-probabilities.json asking for that output only) and bin-<b>.bin + bin-<b>.len (binary extension, binary outputs)."""

import csv
import json
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
with open(REPO / "models/bundles/wdbc-malignancy/testdata/test.csv", newline="") as f:
    reader = csv.reader(f)
    next(reader)
    rows = [[float(v) for v in r[:30]] for r in reader]

for batch in (1, 64):
    chosen = [rows[i % len(rows)] for i in range(batch)]
    flat = [v for r in chosen for v in r]
    body = {"inputs": [{"name": "features", "shape": [batch, 30], "datatype": "FP32", "data": flat}]}
    (out / f"json-{batch}.json").write_text(json.dumps(body))
    # The issue-13 load (benches/load/targets.sh): the same rows asking for `probabilities`.
    body["outputs"] = [{"name": "probabilities"}]
    (out / f"json-{batch}-probabilities.json").write_text(json.dumps(body))
    raw = struct.pack(f"<{len(flat)}f", *flat)
    header = {
        "inputs": [{"name": "features", "shape": [batch, 30], "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                    {"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    h = json.dumps(header).encode()
    (out / f"bin-{batch}.bin").write_bytes(h + raw)
    (out / f"bin-{batch}.len").write_text(str(len(h)))
