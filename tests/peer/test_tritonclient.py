"""Real-peer tests: Triton's own Python HTTP client against the Nightingale server.

The server comes from the session fixture `server_url` in conftest.py: it starts

    $NIGHTINGALE_BIN serve --repository models/bundles --http-addr 127.0.0.1:<free port>

($NIGHTINGALE_BIN default target/debug/nightingale) from the repository root, and the
tests FAIL if it is missing or never becomes ready (nothing here is skipped). Set
$NIGHTINGALE_URL (host:port) instead to run the same tests against a server that is
already running (e.g. a real Triton, to compare protocol behaviour).

These tests exercise the protocol on wdbc-malignancy version 1 (named explicitly in
every inference: the bundle serves versions 1 and 2, and a request without a version
gets 2); tests/peer/test_bundles.py checks every version of every bundle.

Run:  .venv/bin/python -m pytest tests/peer -v
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[2]
MODEL = "wdbc-malignancy"
MODEL_VERSION = "1"
BUNDLE = REPO / "models" / "bundles" / MODEL
N_FEATURES = 30
ATOL = 1e-5

# Successful inferences this session made against MODEL (checked by the stats test).
_infer_count = 0
_infer_lock = threading.Lock()


def _count_inference(n: int = 1) -> None:
    global _infer_count
    with _infer_lock:
        _infer_count += n


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
    res = c.infer(MODEL, [inp], model_version=MODEL_VERSION, outputs=requested)
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


# onnxruntime's element types as Triton's model configuration names them.
_TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(double)": "TYPE_FP64",
                 "tensor(int32)": "TYPE_INT32", "tensor(string)": "TYPE_STRING", "tensor(bool)": "TYPE_BOOL"}


def expected_model_config(version: str) -> dict:
    """Triton's model configuration of a version of MODEL, from its bundle.toml and from
    onnxruntime's reading of its model.onnx (never from the server): with batching on,
    `max_batch_size` is the bundle's and `dims` leave out the batch dimension."""
    import tomllib

    import onnxruntime as ort

    manifest = tomllib.loads((BUNDLE / "bundle.toml").read_text())
    batching = manifest["batching"]
    sess = ort.InferenceSession(str(BUNDLE / version / "model.onnx"), providers=["CPUExecutionProvider"])

    def tensors(ts, with_format):
        out = []
        for t in ts:
            assert not isinstance(t.shape[0], int), t.shape  # the batch dimension is symbolic
            entry = {"name": t.name, "data_type": _TRITON_TYPES[t.type]}
            if with_format:
                entry["format"] = "FORMAT_NONE"
            entry["dims"] = [int(d) for d in t.shape[1:]]
            out.append(entry)
        return out

    assert manifest["version_policy"]["policy"] == "all"
    return {
        "name": MODEL,
        "platform": manifest["platform"],
        "backend": os.environ.get("NIGHTINGALE_BACKEND", "tract"),
        "version_policy": {"all": {}},
        "max_batch_size": batching["max_batch_size"],
        "input": tensors(sess.get_inputs(), True),
        "output": tensors(sess.get_outputs(), False),
        "dynamic_batching": {
            "preferred_batch_size": batching["preferred_batch_sizes"],
            "max_queue_delay_microseconds": batching["max_queue_delay_us"],
        },
        "instance_group": [{"name": MODEL, "kind": "KIND_CPU", "count": batching["instances"]}],
    }


def test_model_config_is_tritons_form(client, test_rows, reference):
    """Triton's model configuration extension, the way clients written for Triton use it:
    read `max_batch_size` and the inputs' `dims`, build a batch of that shape, infer."""
    assert "model_configuration" in client.get_server_metadata()["extensions"]
    for version in (None, MODEL_VERSION):
        config = client.get_model_config(MODEL, model_version=version or "")
        assert config == expected_model_config(version or "2"), config
    config = client.get_model_config(MODEL)
    x, _ = test_rows
    (inp,) = config["input"]
    assert config["max_batch_size"] >= 4
    batch = _batch(x, 4).reshape([4] + inp["dims"])
    i = httpclient.InferInput(inp["name"], list(batch.shape), inp["data_type"].removeprefix("TYPE_"))
    i.set_data_from_numpy(batch)
    res = client.infer(MODEL, [i], model_version=MODEL_VERSION)
    _count_inference()
    _check(res, batch, reference)
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_config("no-such-model")
    with pytest.raises(InferenceServerException):
        client.get_model_config(MODEL, model_version="99")


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


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [False, True])
def test_infer_with_compressed_requests(client, test_rows, reference, algorithm, binary):
    """tritonclient's `request_compression_algorithm`: the body goes gzip- or
    deflate-compressed (Content-Encoding) and the answer is the plain request's."""
    x = _batch(test_rows[0], 16, start=3)
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("label", binary_data=binary),
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    res = client.infer(MODEL, [inp], model_version=MODEL_VERSION, outputs=outputs,
                       request_compression_algorithm=algorithm)
    _count_inference()
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_are_refused(client, test_rows, bad):
    """NaN/inf never reach the engine (tract and onnxruntime disagree on them)."""
    x = np.ascontiguousarray(test_rows[0][:2]).copy()
    x[1, 4] = bad
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(MODEL, [inp], model_version=MODEL_VERSION)
    msg = str(excinfo.value.message() or excinfo.value)
    assert "NaN or infinite" in msg, msg


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
    # The bundle's version policy is "all": versions 1 and 2, both served.
    entries = sorted((e["version"], e["state"], e["reason"]) for e in index if e.get("name") == MODEL)
    assert entries == [("1", "READY", ""), ("2", "READY", "")], index


def test_model_control_needs_the_admin_token(client):
    with pytest.raises(InferenceServerException) as e:
        client.unload_model(MODEL)
    assert "token" in str(e.value).lower(), e.value
    with pytest.raises(InferenceServerException):
        client.unload_model(MODEL, headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert client.is_model_ready(MODEL)


def test_unload_then_load(client, test_rows, reference, admin_headers):
    """Runs last: unloads the model, checks it is gone, loads it and infers again."""
    try:
        client.unload_model(MODEL, headers=admin_headers)
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
        client.load_model(MODEL, headers=admin_headers)
    deadline = time.monotonic() + 30
    while not client.is_model_ready(MODEL) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.is_model_ready(MODEL)
    x = _batch(test_rows[0], 64, start=3)
    _check(_infer(client, x, in_binary=True), x, reference)
    x1 = _batch(test_rows[0], 1, start=5)
    _check(_infer(client, x1, in_binary=False), x1, reference)
