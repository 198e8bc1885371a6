"""Shared fixtures of the real-peer tests (tests/peer/test_*.py).

`server_url` starts ONE Nightingale server for the whole session:

    $NIGHTINGALE_BIN serve --repository models/bundles --http-addr 127.0.0.1:<free port>

from the repository root (binary default target/debug/nightingale), waits up to 60 s
for GET /v2/health/ready to return 200, and stops it at the end, then checks the
audit log's hash chain with `audit verify`. If the binary is missing or never becomes
ready the tests FAIL (nothing here is skipped). Set $NIGHTINGALE_URL (host:port) to run
against a server that is already running instead; when that server is a Nightingale (its
server metadata says so), $NIGHTINGALE_AUDIT_LOG must name its audit log, and the same
`audit verify` check runs on it at the end (a session against another server, such as a
real Triton for comparison, has no audit log to check).

The admin token the server gets is `ADMIN_TOKEN` (fixture `admin_headers`).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient

REPO = Path(__file__).resolve().parents[2]
# The model the protocol tests run on (wdbc-malignancy version 1) and its test split.
WDBC = REPO / "models" / "bundles" / "wdbc-malignancy"
WDBC_ONNX = WDBC / "1" / "model.onnx"
WDBC_TEST_CSV = WDBC / "testdata" / "test.csv"
WDBC_FEATURES = 30
ADMIN_TOKEN = "peer-test-admin-token-0123456789"
READY_TIMEOUT_S = 60.0


@pytest.fixture(scope="session", autouse=True)
def _temporary_folders_under_pytest(tmp_path_factory):
    """Every `tempfile.mkdtemp` of the peer tests (the servers' data and log folders, the TLS
    test PKI) goes under pytest's own temporary folder, which pytest prunes to its last three
    runs: the folders a module's server left used to pile up in /tmp, a hundred per run."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tmp"))
    yield
    tempfile.tempdir = previous


@pytest.fixture(scope="session")
def test_rows() -> tuple[np.ndarray, np.ndarray]:
    """(features FP32 [n, 30], expected_p_malignant) from wdbc-malignancy's test split."""
    with open(WDBC_TEST_CSV, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [r for r in reader]
    assert header[WDBC_FEATURES] == "label" and header[WDBC_FEATURES + 1] == "expected_p_malignant"
    x = np.array([[float(v) for v in r[:WDBC_FEATURES]] for r in rows], dtype=np.float32)
    p = np.array([float(r[WDBC_FEATURES + 1]) for r in rows], dtype=np.float32)
    return x, p


@pytest.fixture(scope="session")
def reference():
    """onnxruntime on wdbc-malignancy version 1: features -> (label, probabilities)."""
    sess = ort.InferenceSession(str(WDBC_ONNX), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        label, prob = sess.run(["label", "probabilities"], {"features": x})
        return label, prob

    return run


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ort_dylib() -> str | None:
    """The libonnxruntime shipped in the onnxruntime wheel, for a server built
    with ort's load-dynamic feature (it reads ORT_DYLIB_PATH)."""
    capi = Path(ort.__file__).resolve().parent / "capi"
    libs = sorted(capi.glob("libonnxruntime.so*"))
    return str(libs[-1]) if libs else None


def _tail(path: Path, n_bytes: int = 20000) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return data[-n_bytes:].decode("utf-8", errors="replace")


def wait_ready(proc: subprocess.Popen, addr: str, log: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Waits (bounded) until the server at `addr` answers GET /v2/health/ready with 200; fails
    with the server's log if it exits or does not become ready in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}\n" + _tail(log)
        try:
            if requests.get(f"http://{addr}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"not ready in {timeout_s:.0f} s\n" + _tail(log)
        time.sleep(0.1)


@pytest.fixture(scope="session")
def server_url(request) -> str:
    external = os.environ.get("NIGHTINGALE_URL")
    if external:
        md = requests.get(f"http://{external}/v2", timeout=10).json()
        audit_log = os.environ.get("NIGHTINGALE_AUDIT_LOG")
        if md.get("name") == "nightingale" and not audit_log:
            pytest.fail(
                "NIGHTINGALE_URL names a Nightingale server: set NIGHTINGALE_AUDIT_LOG to its "
                "audit log so that the session's audit check runs",
                pytrace=False,
            )
        yield external
        if audit_log:
            binary = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
            if not binary.is_absolute():
                binary = REPO / binary
            check = subprocess.run([str(binary), "audit", "verify", audit_log],
                                   capture_output=True, text=True, timeout=120)
            assert check.returncode == 0, check.stdout + check.stderr
        return

    bin_env = os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale")
    binary = Path(bin_env)
    if not binary.is_absolute():
        binary = REPO / binary
    if not binary.exists():
        pytest.fail(
            f"Nightingale server binary not found at {binary} "
            "(build it with `cargo build` or set NIGHTINGALE_BIN)",
            pytrace=False,
        )

    port = _free_port()
    addr = f"127.0.0.1:{port}"
    logdir = Path(tempfile.mkdtemp(prefix="nightingale-peer-"))
    stderr_path = logdir / "stderr.log"
    stdout_path = logdir / "stdout.log"
    env = dict(os.environ)
    env["NIGHTINGALE_ADMIN_TOKEN"] = ADMIN_TOKEN
    if "ORT_DYLIB_PATH" not in env:
        lib = _ort_dylib()
        if lib:
            env["ORT_DYLIB_PATH"] = lib
    cmd = [str(binary), "serve", "--repository", "models/bundles", "--http-addr", addr,
           "--audit-log", str(logdir / "audit.jsonl")]
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env=env)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    deadline = time.monotonic() + READY_TIMEOUT_S
    ready = False
    last = "no response"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = f"server exited with status {proc.returncode}"
            break
        try:
            r = requests.get(f"http://{addr}/v2/health/ready", timeout=2)
            if r.status_code == 200:
                ready = True
                break
            last = f"HTTP {r.status_code}"
        except requests.RequestException as e:
            last = repr(e)
        time.sleep(0.2)
    if not ready:
        stop()
        pytest.fail(
            f"server `{' '.join(cmd)}` not ready within {READY_TIMEOUT_S:.0f} s ({last}).\n"
            f"--- server stderr ---\n{_tail(stderr_path)}\n"
            f"--- server stdout ---\n{_tail(stdout_path)}",
            pytrace=False,
        )

    yield addr

    stop()
    # Every inference the session made is in the audit log, and its hash chain holds.
    check = subprocess.run([str(binary), "audit", "verify", str(logdir / "audit.jsonl")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    n_records = int(check.stdout.split(":")[1].split()[0])
    # The whole suite makes hundreds of inferences; a subset run (-k, one file) fewer.
    assert n_records > (100 if request.session.testscollected > 50 else 0), check.stdout
    if request.session.testsfailed:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        text = f"--- Nightingale server stderr ({stderr_path}) ---\n{_tail(stderr_path)}"
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(text)
        else:
            print(text)
    else:
        shutil.rmtree(logdir, ignore_errors=True)


@pytest.fixture(scope="session")
def client(server_url):
    c = httpclient.InferenceServerClient(url=server_url, network_timeout=30.0)
    yield c
    c.close()


def _rebuilt_testdata(bundle: str, script: str, timeout_s: int) -> Path:
    """The bundle's testdata/ when present, else the folder its training script's
    --testdata-only rebuilds from the real DICOM files in the PyPI packages: once per
    checkout and version of the training scripts, kept under target/peer-cache/ so that the
    second engine's session (scripts/test.sh runs the peers on tract, then on ort) reads it
    back instead of rebuilding it (a minute or two of CI each)."""
    folder = REPO / "models" / "bundles" / bundle / "testdata"
    if (folder / "images.npy").exists():
        return folder
    digest = hashlib.sha256()
    for source in sorted((REPO / "models" / "train").glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    cache = REPO / "target" / "peer-cache" / f"{bundle}-testdata-{digest.hexdigest()[:16]}"
    if (cache / "images.npy").exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{cache.name}.tmp-", dir=cache.parent))
    proc = subprocess.run(
        [sys.executable, str(REPO / "models/train" / script), "--testdata-only", "--out", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
    )
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, f"--testdata-only failed:\n{proc.stdout}\n{proc.stderr}"
    try:
        # Whole or not at all: a session killed while rebuilding leaves no half folder here.
        os.rename(work, cache)
    except OSError:
        # Another session placed it first: that one is read.
        shutil.rmtree(work, ignore_errors=True)
    return cache


@pytest.fixture(scope="session")
def orientation_testdata() -> Path:
    """The folder of image-orientation's held-out test split (images.npy, labels.npy,
    samples.json): see `_rebuilt_testdata`."""
    return _rebuilt_testdata("image-orientation", "image_orientation.py", 600)


@pytest.fixture(scope="session")
def lesion_testdata() -> Path:
    """The folder of lesion-detection's held-out test split (images.npy [300, 1, 128, 128],
    labels.npy, masks.npy): see `_rebuilt_testdata`."""
    return _rebuilt_testdata("lesion-detection", "lesion_detection.py", 900)
