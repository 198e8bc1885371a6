"""Triton HTTP parity: the behaviours Triton's own HTTP QA suite (`qa/L0_http/http_test.py`
in triton-inference-server/server) and its binary-data extension assert, checked with
`requests` against the live server (session fixture `server_url`, conftest.py), with every
expected value from onnxruntime on the bundle's model. Error texts are Nightingale's own;
statuses and behaviour follow Triton's, except where noted.

Not carried over: `test_loading_large_invalid_model` (Nightingale's load endpoint takes no
model files in the request), `test_content_encoding_unsupported_client` (a client-side check
of tritonclient), and the queue-full `test_descriptive_status_code` (a 503 needs a full
queue, which tests/http.rs and inference/tests/worker.rs build deterministically).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

MODEL = "wdbc-malignancy"
MODEL_VERSION = "1"
N_FEATURES = 30
ATOL = 1e-5

TIMEOUT = 30


def _url(server_url: str, model: str = MODEL, version: str | None = MODEL_VERSION) -> str:
    v = f"/versions/{version}" if version else ""
    return f"http://{server_url}/v2/models/{model}{v}/infer"


def _error(r: requests.Response) -> str:
    assert r.headers.get("content-type") == "application/json", r.headers
    return r.json()["error"]


def _split_binary(r: requests.Response) -> tuple[dict, bytes]:
    n = int(r.headers["Inference-Header-Content-Length"])
    return json.loads(r.content[:n]), r.content[n:]


def _check_raw_answer(r: requests.Response, x: np.ndarray, reference) -> None:
    assert r.status_code == 200, r.text
    header, tail = _split_binary(r)
    want_label, want_prob = reference(x)
    outputs = {o["name"]: o for o in header["outputs"]}
    assert outputs["label"]["shape"] == [len(x)]
    assert outputs["probabilities"]["shape"] == [len(x), 2]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert sum(sizes) == len(tail)
    offset = 0
    for o, size in zip(header["outputs"], sizes):
        part = tail[offset : offset + size]
        offset += size
        if o["name"] == "label":
            np.testing.assert_array_equal(np.frombuffer(part, dtype=np.int64), want_label.astype(np.int64))
        else:
            got = np.frombuffer(part, dtype=np.float32).reshape(len(x), 2)
            np.testing.assert_allclose(got, want_prob, rtol=0, atol=ATOL)


@pytest.mark.parametrize("rows", [1, 8])
def test_raw_binary(server_url, test_rows, reference, rows):
    """`test_raw_binary`, `test_raw_binary_longer`: the body is the one input's bytes."""
    x = np.ascontiguousarray(test_rows[0][:rows])
    r = requests.post(_url(server_url), data=x.tobytes(), headers={"Inference-Header-Content-Length": "0"}, timeout=TIMEOUT)
    _check_raw_answer(r, x, reference)


def test_raw_binary_chunked(server_url, test_rows, reference):
    """`test_content_encoding_chunked_manually`: the same raw body in chunks, no Content-Length."""
    x = np.ascontiguousarray(test_rows[0][:5])
    raw = x.tobytes()

    def chunks():
        for i in range(0, len(raw), 100):
            yield raw[i : i + 100]

    r = requests.post(_url(server_url), data=chunks(), headers={"Inference-Header-Content-Length": "0"}, timeout=TIMEOUT)
    _check_raw_answer(r, x, reference)


def test_raw_binary_that_is_not_whole_rows(server_url, test_rows):
    raw = np.ascontiguousarray(test_rows[0][:2]).tobytes()[:-4]
    r = requests.post(_url(server_url), data=raw, headers={"Inference-Header-Content-Length": "0"}, timeout=TIMEOUT)
    assert r.status_code == 400
    assert _error(r) == (
        f'raw input "features": {len(raw)} bytes are not a whole number of FP32 elements of shape [-1, {N_FEATURES}]'
    )


def test_duplicate_output_names(server_url, test_rows):
    """`test_duplicate_output_names`: 400, and the server stays healthy."""
    x = test_rows[0][:1]
    payload = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, N_FEATURES], "data": x.tolist()}],
        "outputs": [{"name": "probabilities"}, {"name": "probabilities"}],
    }
    r = requests.post(_url(server_url), json=payload, timeout=TIMEOUT)
    assert r.status_code == 400
    assert _error(r) == 'output "probabilities" is requested more than once'
    assert requests.get(f"http://{server_url}/v2/health/live", timeout=TIMEOUT).status_code == 200


def test_duplicate_input_names(server_url, test_rows):
    one = {"name": "features", "datatype": "FP32", "shape": [1, N_FEATURES], "data": test_rows[0][0].tolist()}
    r = requests.post(_url(server_url), json={"inputs": [one, one]}, timeout=TIMEOUT)
    assert r.status_code == 400
    assert _error(r) == 'input "features" is given more than once'


@pytest.mark.parametrize("depth,ok", [(50, True), (100, True), (101, False), (120, False)])
def test_json_nesting_depth_limit(server_url, test_rows, reference, depth, ok):
    """`test_json_recursion_depth_limit`: nested `data` up to 100 levels decodes, deeper is a 400."""
    x = np.ascontiguousarray(test_rows[0][:1])
    data: object = x[0].tolist()
    for _ in range(depth - 1):
        data = [data]
    payload = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, N_FEATURES], "data": data}],
        "outputs": [{"name": "probabilities"}],
    }
    r = requests.post(_url(server_url), json=payload, timeout=TIMEOUT)
    if ok:
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(1, 2)
        np.testing.assert_allclose(got, reference(x)[1], rtol=0, atol=ATOL)
    else:
        assert r.status_code == 400
        assert _error(r) == 'input "features": data is nested deeper than 100 levels'


@pytest.mark.parametrize("shape", [[2**4, 2**60 + 2], [2**2, 2**60 + 2]])
def test_element_count_overflow(server_url, shape):
    """`test_buffer_size_overflow`: a shape whose element or byte count overflows is a 400."""
    payload = {"inputs": [{"name": "features", "shape": shape, "datatype": "FP32", "data": [1.0]}]}
    r = requests.post(_url(server_url), json=payload, timeout=TIMEOUT)
    assert r.status_code == 400
    assert _error(r) == f'input "features": shape {shape} is too large'.replace("'", '"')


def test_negative_dimensions(server_url):
    """`test_negative_dimensions`: Triton answers 500; a malformed request is the client's
    error, so Nightingale answers 400."""
    payload = {"inputs": [{"name": "features", "shape": [2, -5], "datatype": "FP32", "data": [1.0]}]}
    r = requests.post(_url(server_url), json=payload, timeout=TIMEOUT)
    assert r.status_code == 400
    assert _error(r) == 'input "features": shape [2, -5] has a negative dimension'


@pytest.mark.parametrize(
    "method,path,status",
    [
        ("GET", "/v2/models/%FF/ready", 400),
        ("POST", "/v2/models/%FF/infer", 400),
        ("POST", "/v2/repository/models/%FF/load", 400),
        ("PUT", f"/v2/models/{MODEL}/infer", 405),
        ("GET", "/v2/no/such/endpoint", 404),
    ],
)
def test_every_rejection_is_a_json_error(server_url, admin_headers, method, path, status):
    # With the admin token: authentication comes before a handler reads its path.
    r = requests.request(method, f"http://{server_url}{path}", headers=admin_headers, timeout=TIMEOUT)
    assert r.status_code == status
    assert _error(r)


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """A header field as an HPACK literal without indexing, new name, no Huffman coding."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def test_http2_early_refusal_is_a_complete_answer_then_no_error_reset(server_url):
    """A request refused before its body is read (an unknown model, declaring 20 MB and
    sending 60 KB of it) over HTTP/2 gets its whole answer (HEADERS, DATA with END_STREAM)
    and then RST_STREAM with NO_ERROR, as RFC 9113 8.1 asks of a server that answers early.
    curl 7.88 reports that reset as a stream error (its exit 92) and drops the answer it was
    sent (a red-team pass took it for a server fault); read here frame by frame."""
    import socket
    import time

    host, port = server_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(0x4, 0, 0, b""))
        fields = b"".join(
            _hpack_literal(k, v)
            for k, v in [
                (":method", "POST"),
                (":path", "/v2/models/no-such-model/infer"),
                (":scheme", "http"),
                (":authority", server_url),
                ("content-length", "20000000"),
            ]
        )
        s.sendall(_h2_frame(0x1, 0x4, 1, fields))  # HEADERS, END_HEADERS
        for _ in range(4):
            s.sendall(_h2_frame(0x0, 0, 1, b"x" * 15000))  # DATA, within the first window
        frames: list[tuple[int, int, bytes]] = []
        buf = b""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not any(f[0] == 0x3 for f in frames):
            s.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n = int.from_bytes(buf[:3], "big")
                stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                if stream == 1:
                    frames.append((buf[3], buf[4], buf[9 : 9 + n]))
                buf = buf[9 + n :]
    kinds = [f[0] for f in frames]
    assert kinds[0] == 0x1 and 0x3 in kinds, kinds  # HEADERS first, a reset at the end
    data = [f for f in frames if f[0] == 0x0]
    assert data and data[-1][1] & 0x1, "the answer's DATA ends the stream before the reset"
    assert kinds.index(0x3) > kinds.index(0x0)
    assert b"no-such-model" in b"".join(f[2] for f in data)
    reset = next(f for f in frames if f[0] == 0x3)
    assert int.from_bytes(reset[2], "big") == 0, "RST_STREAM with NO_ERROR"
