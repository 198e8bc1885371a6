"""The audit trail's tensor digests are keyed (docs/security.md, "Audit digests").

A record's `input_sha256` / `output_sha256` is HMAC-SHA256, under the deployment's audit
digest key (`--audit-digest-key`, made at the first start), of the hex of the canonical
SHA-256 of the tensors (each by name: name length, name, datatype, rank, dimensions, raw
little-endian bytes). A plain SHA-256 of a tabular model's few small-range inputs was turned
back into the patient's values by trying every combination (a red-team finding). Here an
auditor's recomputation, in Python with the key file, finds the record's digest; the plain
digest is not what the record holds; a second start keeps the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import requests

from conftest import REPO, READY_TIMEOUT_S, WDBC_FEATURES, _free_port, _tail

MODEL = "wdbc-malignancy"


def canonical_sha256(tensors: dict[str, tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        datatype, array = tensors[name]
        h.update(struct.pack("<Q", len(name.encode())) + name.encode())
        h.update(datatype.encode())
        h.update(struct.pack("<Q", array.ndim))
        for d in array.shape:
            h.update(struct.pack("<Q", d))
        h.update(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


def start(data: Path, log: Path) -> tuple[subprocess.Popen, str]:
    binary = Path(os.environ.get("NIGHTINGALE_BIN", REPO / "target" / "debug" / "nightingale"))
    addr = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([str(binary), "serve", "--repository", "models/bundles",
                             "--http-addr", addr, "--data-dir", str(data)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, _tail(log)
        try:
            if requests.get(f"http://{addr}/v2/health/ready", timeout=2).status_code == 200:
                return proc, addr
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"not ready: {_tail(log)}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=20)


def test_a_record_digest_is_the_keyed_hmac_an_auditor_recomputes(tmp_path):
    data = tmp_path / "data"
    x = np.linspace(1.0, 30.0, WDBC_FEATURES, dtype=np.float32).reshape(1, WDBC_FEATURES)
    keys = []
    for run in range(2):
        proc, addr = start(data, tmp_path / f"server{run}.log")
        try:
            body = {"id": f"digest-{run}", "inputs": [{"name": "features", "shape": [1, WDBC_FEATURES],
                                                       "datatype": "FP32", "data": x.ravel().tolist()}]}
            r = requests.post(f"http://{addr}/v2/models/{MODEL}/infer", json=body, timeout=30,
                              headers={"x-request-id": f"digest-peer-{run}"})
            assert r.status_code == 200, r.text
        finally:
            stop(proc)
        key_file = data / "audit-digest.key"
        assert key_file.stat().st_mode & 0o077 == 0, oct(key_file.stat().st_mode)
        keys.append(key_file.read_text())
    assert keys[0] == keys[1], "a restart made a new key"
    key = bytes.fromhex(keys[0].strip())
    assert len(key) == 32

    records = [json.loads(line) for f in sorted((data / "audit").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    plain = canonical_sha256({"features": ("FP32", x)})
    expected = hmac.new(key, plain.encode(), hashlib.sha256).hexdigest()
    for run in range(2):
        [record] = [r for r in records if r.get("request_id") == f"digest-peer-{run}"]
        assert record["kind"] == "inference" and record["status"] == 200
        assert record["input_sha256"] == expected, (record, expected)
        assert record["input_sha256"] != plain
        assert record["output_sha256"] and len(record["output_sha256"]) == 64
    binary = os.environ.get("NIGHTINGALE_BIN", str(REPO / "target" / "debug" / "nightingale"))
    check = subprocess.run([binary, "audit", "verify", str(data / "audit")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    # Each start says which key seals the records after it (its id: the first 16 hex digits
    # of the key's SHA-256), and whether it was made then; a key deleted beside the trail is
    # made anew at the next start, and the trail shows the change.
    key_id = hashlib.sha256(key).hexdigest()[:16]
    starts = [r for r in records if r["kind"] == "server-start"]
    assert [r["detail"].split("; ", 1)[1] for r in starts] == [
        f"tensor digests sealed with audit digest key {key_id} (made at this start)",
        f"tensor digests sealed with audit digest key {key_id} (read from its file)",
    ], starts
    assert records[0]["kind"] == "server-start" and records[0]["actor"] == "startup"
    (data / "audit-digest.key").unlink()
    proc, _ = start(data, tmp_path / "server2.log")
    stop(proc)
    new_key = bytes.fromhex((data / "audit-digest.key").read_text().strip())
    assert new_key != key
    starts = [r for f in sorted((data / "audit").glob("*.jsonl"))
              for r in map(json.loads, f.read_text().splitlines()) if r["kind"] == "server-start"]
    assert len(starts) == 3, starts
    last = starts[-1]
    assert last["detail"].endswith(
        f"audit digest key {hashlib.sha256(new_key).hexdigest()[:16]} (made at this start)"), last
