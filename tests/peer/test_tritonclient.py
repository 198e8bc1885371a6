"""Real-peer tests: Triton's own Python HTTP client against the Nightingale server.

The server binary comes from $NIGHTINGALE_BIN (default target/debug/nightingale,
relative to the repository root). A session-scoped fixture starts

    $NIGHTINGALE_BIN serve --repository models/bundles --http-addr 127.0.0.1:<free port>

from the repository root, waits up to 60 s for GET /v2/health/ready to return 200,
and stops it at the end. If the binary is missing or never becomes ready the tests
FAIL (nothing here is skipped).

Set $NIGHTINGALE_URL (host:port) instead to run the same tests against a server
that is already running (e.g. a real Triton, to compare protocol behaviour).

Run:  .venv/bin/python -m pytest tests/peer -v
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[2]
MODEL = "wdbc-malignancy"
ADMIN_TOKEN = "peer-test-admin-token-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BUNDLE = REPO / "models" / "bundles" / MODEL
ONNX_PATH = BUNDLE / "1" / "model.onnx"
TEST_CSV = BUNDLE / "testdata" / "test.csv"
N_FEATURES = 30
ATOL = 1e-5
READY_TIMEOUT_S = 60.0

# Successful inferences this session made against MODEL (checked by the stats test).
_infer_count = 0
_infer_lock = threading.Lock()


def _count_inference(n: int = 1) -> None:
    global _infer_count
    with _infer_lock:
        _infer_count += n


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


@pytest.fixture(scope="session")
def server_url(request) -> str:
    external = os.environ.get("NIGHTINGALE_URL")
    if external:
        yield external
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
    assert n_records > 100, check.stdout
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


@pytest.fixture(scope="session")
def test_rows() -> tuple[np.ndarray, np.ndarray]:
    """(features FP32 [n, 30], expected_p_malignant) from the bundle's test split."""
    with open(TEST_CSV, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [r for r in reader]
    assert header[N_FEATURES] == "label" and header[N_FEATURES + 1] == "expected_p_malignant"
    x = np.array([[float(v) for v in r[:N_FEATURES]] for r in rows], dtype=np.float32)
    p = np.array([float(r[N_FEATURES + 1]) for r in rows], dtype=np.float32)
    return x, p


@pytest.fixture(scope="session")
def reference():
    """onnxruntime on the bundle's model: features -> (label, probabilities)."""
    sess = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        label, prob = sess.run(["label", "probabilities"], {"features": x})
        return label, prob

    return run


def _batch(x: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """n rows, starting at `start`, repeating the test split as needed."""
    idx = (start + np.arange(n)) % len(x)
    return np.ascontiguousarray(x[idx])


def _infer(c, x: np.ndarray, in_binary: bool, out_binary: bool | None = None, outputs=True):
    if out_binary is None:
        out_binary = in_binary
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=in_binary)
    requested = None
    if outputs:
        requested = [
            httpclient.InferRequestedOutput("label", binary_data=out_binary),
            httpclient.InferRequestedOutput("probabilities", binary_data=out_binary),
        ]
    res = c.infer(MODEL, [inp], outputs=requested)
    _count_inference()
    return res


def _check(res, x: np.ndarray, reference) -> None:
    want_label, want_prob = reference(x)
    prob = res.as_numpy("probabilities")
    label = res.as_numpy("label")
    assert prob is not None, "no `probabilities` in the response"
    assert label is not None, "no `label` in the response"
    assert res.get_output("probabilities")["datatype"] == "FP32"
    assert res.get_output("label")["datatype"] == "INT64"
    assert list(res.get_output("probabilities")["shape"]) == [len(x), 2]
    assert list(res.get_output("label")["shape"]) == [len(x)]
    assert prob.shape == (len(x), 2)
    assert label.shape == (len(x),)
    np.testing.assert_allclose(prob.astype(np.float64), want_prob.astype(np.float64), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(label.astype(np.int64), want_label.astype(np.int64))


# --- health and metadata -------------------------------------------------------


def test_reference_matches_bundle_testdata(test_rows, reference):
    x, p = test_rows
    _, prob = reference(x)
    np.testing.assert_allclose(prob[:, 0], p, rtol=0, atol=1e-6)


def test_server_live(client):
    assert client.is_server_live()


def test_server_ready(client):
    assert client.is_server_ready()


def test_model_ready(client):
    assert client.is_model_ready(MODEL)


def test_unknown_model_not_ready(client):
    assert not client.is_model_ready("no-such-model")


def test_server_metadata(client):
    md = client.get_server_metadata()
    assert isinstance(md.get("name"), str) and md["name"]
    assert isinstance(md.get("version"), str) and md["version"]
    assert isinstance(md.get("extensions", []), list)


def test_model_metadata(client):
    md = client.get_model_metadata(MODEL)
    assert md["name"] == MODEL
    assert md.get("platform"), md
    inputs = {t["name"]: t for t in md["inputs"]}
    outputs = {t["name"]: t for t in md["outputs"]}
    assert set(inputs) == {"features"}
    assert inputs["features"]["datatype"] == "FP32"
    assert [int(d) for d in inputs["features"]["shape"]] == [-1, N_FEATURES]
    assert set(outputs) == {"label", "probabilities"}
    assert outputs["label"]["datatype"] == "INT64"
    assert [int(d) for d in outputs["label"]["shape"]] == [-1]
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert [int(d) for d in outputs["probabilities"]["shape"]] == [-1, 2]
    # The engine the server was started with (NIGHTINGALE_BACKEND), default tract.
    expected_backend = os.environ.get("NIGHTINGALE_BACKEND", "tract")
    assert md.get("parameters", {}).get("backend") == expected_backend, md


def test_unknown_model_metadata_raises(client):
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("no-such-model")


# --- inference ------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("in_binary,out_binary", [(False, False), (True, True), (True, False), (False, True)])
def test_infer(client, test_rows, reference, batch, in_binary, out_binary):
    x = _batch(test_rows[0], batch, start=7 * batch)
    res = _infer(client, x, in_binary, out_binary)
    _check(res, x, reference)


@pytest.mark.parametrize("binary", [False, True])
def test_infer_full_test_split_in_batches(client, test_rows, reference, binary):
    x = test_rows[0]
    for start in range(0, len(x), 64):
        chunk = np.ascontiguousarray(x[start : start + 64])
        _check(_infer(client, chunk, binary), chunk, reference)


def test_infer_without_requested_outputs_returns_all(client, test_rows, reference):
    x = _batch(test_rows[0], 3)
    res = _infer(client, x, in_binary=False, outputs=False)
    _check(res, x, reference)


def test_infer_unknown_model_raises(client, test_rows):
    x = _batch(test_rows[0], 1)
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    with pytest.raises(InferenceServerException):
        client.infer("no-such-model", [inp])


@pytest.mark.parametrize("binary", [False, True])
def test_infer_wrong_shape_raises(client, test_rows, binary):
    x = np.ascontiguousarray(test_rows[0][:1, :29])
    inp = httpclient.InferInput("features", [1, 29], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(MODEL, [inp])
    msg = str(excinfo.value.message() or excinfo.value)
    assert "shape" in msg.lower(), msg
    assert "29" in msg, msg


def test_concurrent_requests_batch1_binary(server_url, test_rows, reference):
    """16 threads x 20 requests of batch 1, all at once (exercises dynamic batching)."""
    x_all = test_rows[0]
    threads, per_thread = 16, 20
    want_label, want_prob = reference(x_all)
    barrier = threading.Barrier(threads)

    def worker(w: int) -> list[str]:
        errors = []
        c = httpclient.InferenceServerClient(url=server_url, network_timeout=60.0)
        try:
            barrier.wait(timeout=30)
            for j in range(per_thread):
                i = (w * per_thread + j) % len(x_all)
                x = np.ascontiguousarray(x_all[i : i + 1])
                try:
                    res = _infer(c, x, in_binary=True)
                except InferenceServerException as e:
                    errors.append(f"thread {w} request {j}: {e}")
                    continue
                prob = res.as_numpy("probabilities")
                label = res.as_numpy("label")
                if prob is None or prob.shape != (1, 2) or label is None or label.shape != (1,):
                    errors.append(f"thread {w} request {j}: bad output shapes")
                    continue
                if np.max(np.abs(prob[0].astype(np.float64) - want_prob[i])) > ATOL or int(label[0]) != int(want_label[i]):
                    errors.append(f"thread {w} request {j} row {i}: got {prob[0]}/{label[0]}, want {want_prob[i]}/{want_label[i]}")
        finally:
            c.close()
        return errors

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(worker, range(threads)))
    errors = [e for r in results for e in r]
    assert not errors, f"{len(errors)} of {threads * per_thread} requests wrong:\n" + "\n".join(errors[:20])


# --- statistics and repository ----------------------------------------------------


def test_inference_statistics(client, test_rows):
    # Make sure at least one inference happened even if run alone.
    _infer(client, _batch(test_rows[0], 1), in_binary=True)
    with _infer_lock:
        made = _infer_count
    stats = client.get_inference_statistics(MODEL)
    entries = [s for s in stats["model_stats"] if s["name"] == MODEL]
    assert entries, stats
    success = sum(int(s["inference_stats"]["success"]["count"]) for s in entries)
    assert success >= made, f"success count {success} < {made} inferences made: {stats}"


def test_repository_index(client):
    index = client.get_model_repository_index()
    entries = [e for e in index if e.get("name") == MODEL]
    assert entries, index
    states = [e["state"] for e in entries if "state" in e]
    assert not states or "READY" in states, entries


def test_model_control_needs_the_admin_token(client):
    with pytest.raises(InferenceServerException) as e:
        client.unload_model(MODEL)
    assert "token" in str(e.value).lower(), e.value
    with pytest.raises(InferenceServerException):
        client.unload_model(MODEL, headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert client.is_model_ready(MODEL)


def test_unload_then_load(client, test_rows, reference):
    """Runs last: unloads the model, checks it is gone, loads it and infers again."""
    try:
        client.unload_model(MODEL, headers=ADMIN_HEADERS)
        deadline = time.monotonic() + 30
        while client.is_model_ready(MODEL) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.is_model_ready(MODEL)
        x = _batch(test_rows[0], 1)
        inp = httpclient.InferInput("features", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, [inp])
    finally:
        client.load_model(MODEL, headers=ADMIN_HEADERS)
    deadline = time.monotonic() + 30
    while not client.is_model_ready(MODEL) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.is_model_ready(MODEL)
    x = _batch(test_rows[0], 64, start=3)
    _check(_infer(client, x, in_binary=True), x, reference)
    x1 = _batch(test_rows[0], 1, start=5)
    _check(_infer(client, x1, in_binary=False), x1, reference)
