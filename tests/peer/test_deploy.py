"""A new version arriving while clients infer: 16 tritonclient clients keep sending requests to
a server whose repository poller is on, a new version of wdbc-malignancy is dropped into the
repository (staged beside it, then renamed into place, as a deployment tool would), and every
request must succeed, the new version must serve after the swap, and its answers must be
onnxruntime's for that version. Then a broken version (model file not matching its checksum)
is dropped in: refused, the old version keeps serving, the index says why.

The time from the rename to the first answer by the new version is printed (it is the
benchmark figure in docs/performance.md; no assertion is made on it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient

from conftest import REPO, _free_port, _tail, wait_ready

BUNDLE = REPO / "models" / "bundles" / "wdbc-malignancy"
CLIENTS = 16


def _binary() -> Path:
    binary = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    return binary if binary.is_absolute() else REPO / binary


@pytest.fixture
def server(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLE, repo / BUNDLE.name, ignore=shutil.ignore_patterns("2", "testdata"))
    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [str(_binary()), "serve", "--repository", str(repo), "--http-addr", f"127.0.0.1:{port}",
           "--data-dir", str(tmp_path / "data"), "--repository-poll-secs", "0.2",
           "--trusted-key", str(REPO / "keys" / "demo" / "nightingale-demo.pub"), "--require-signatures"]
    env = dict(os.environ)
    if os.environ.get("NIGHTINGALE_BACKEND"):
        cmd += ["--backend", os.environ["NIGHTINGALE_BACKEND"]]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)
    url = f"127.0.0.1:{port}"
    wait_ready(proc, url, log)
    yield url, repo, tmp_path, log
    proc.terminate()
    proc.wait(timeout=30)
    check = subprocess.run([str(_binary()), "audit", "verify", str(tmp_path / "data" / "audit")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def _stage(version_dir: Path, staging: Path, corrupt: bool = False) -> None:
    shutil.copytree(version_dir, staging)
    if corrupt:
        model = staging / "model.onnx"
        data = bytearray(model.read_bytes())
        data[100] ^= 1
        model.write_bytes(bytes(data))


def test_a_new_version_swaps_in_under_load_without_a_failed_request(server):
    url, repo, tmp, log = server
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 30)) * 2 + 5).astype(np.float32)
    want = {}
    for v in ("1", "2"):
        sess = ort.InferenceSession(str(BUNDLE / v / "model.onnx"), providers=["CPUExecutionProvider"])
        want[v] = sess.run(["probabilities"], {"features": x})[0]

    stop = threading.Event()
    failures: list[str] = []
    answers: list[tuple[float, str]] = []
    lock = threading.Lock()

    def client() -> None:
        c = httpclient.InferenceServerClient(url, network_timeout=30)
        inp = httpclient.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=True)
        while not stop.is_set():
            try:
                r = c.infer(BUNDLE.name, [inp], outputs=[out])
                version = r.get_response()["model_version"]
                got = r.as_numpy("probabilities")
                if not np.allclose(got, want[version], atol=1e-5, rtol=1e-4):
                    with lock:
                        failures.append(f"version {version}: {got} != {want[version]}")
                with lock:
                    answers.append((time.monotonic(), version))
            except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                with lock:
                    failures.append(repr(e))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        staging = tmp / "staging-2"
        _stage(BUNDLE / "2", staging)
        dropped = time.monotonic()
        os.rename(staging, repo / BUNDLE.name / "2")
        deadline = dropped + 60
        while time.monotonic() < deadline:
            with lock:
                if any(v == "2" for _, v in answers):
                    break
            time.sleep(0.02)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures[:5]
    first_v2 = min((t for t, v in answers if v == "2"), default=None)
    assert first_v2 is not None, "version 2 never served\n" + _tail(log)
    # Once version 2 serves, unversioned requests go to it (policy: all, highest answers).
    late = [v for t, v in answers if t > first_v2 + 0.5]
    assert late and set(late) == {"2"}, set(late)
    print(f"\n{len(answers)} requests by {CLIENTS} clients, 0 failed; new version on disk -> "
          f"first answer by it: {first_v2 - dropped:.2f} s (poll interval 0.2 s)")

    # A broken version 3 would need a new manifest (and signature); a broken replacement of
    # version 2's files is what a bad copy looks like: refused, version 2's last good load
    # keeps serving.
    shutil.rmtree(repo / BUNDLE.name / "2")
    staging = tmp / "staging-2b"
    _stage(BUNDLE / "2", staging, corrupt=True)
    os.rename(staging, repo / BUNDLE.name / "2")
    deadline = time.monotonic() + 60
    index = []
    while time.monotonic() < deadline:
        index = requests.post(f"http://{url}/v2/repository/index", timeout=10).json()
        if any(r["state"] == "UNAVAILABLE" for r in index):
            break
        time.sleep(0.1)
    refused = [r for r in index if r["state"] == "UNAVAILABLE"]
    assert refused, index
    assert "checksum mismatch" in refused[0]["reason"] and "2/model.onnx" in refused[0]["reason"]
    c = httpclient.InferenceServerClient(url)
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = c.infer(BUNDLE.name, [inp])
    assert r.get_response()["model_version"] == "2"
    np.testing.assert_allclose(r.as_numpy("probabilities"), want["2"], atol=1e-5, rtol=1e-4)
