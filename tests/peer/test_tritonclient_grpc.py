"""Real-peer tests: Triton's own Python gRPC client (tritonclient.grpc) against Nightingale's
KServe v2 gRPC service (`serve --grpc-addr`).

The module starts its own server with both listeners,

    $NIGHTINGALE_BIN serve --repository models/bundles --http-addr 127.0.0.1:<port> \
        --grpc-addr 127.0.0.1:<port>

so that every answer over gRPC can be compared with the same server's answer over HTTP
(tritonclient.http) and with onnxruntime. The binary must be built with the `grpc` feature
(the default). The tests FAIL if it is missing or never becomes ready; nothing is skipped.
At the end the audit log's hash chain is checked with `audit verify`, and it must hold a
record for every gRPC inference made here.

Run:  .venv/bin/python -m pytest tests/peer/test_tritonclient_grpc.py -v
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import ADMIN_TOKEN, REPO, _free_port, _ort_dylib, _tail, wait_ready

MODEL = "wdbc-malignancy"
VERSION = "1"
ATOL = 1e-5

_grpc_request_ids: list[str] = []


@pytest.fixture(scope="module")
def servers():
    """(http_addr, grpc_addr) of one server started for this module."""
    binary = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    if not binary.is_absolute():
        binary = REPO / binary
    if not binary.exists():
        pytest.fail(f"Nightingale server binary not found at {binary}", pytrace=False)
    http_addr = f"127.0.0.1:{_free_port()}"
    grpc_addr = f"127.0.0.1:{_free_port()}"
    logdir = Path(tempfile.mkdtemp(prefix="nightingale-grpc-peer-"))
    audit_log = logdir / "audit.jsonl"
    env = dict(os.environ)
    env["NIGHTINGALE_ADMIN_TOKEN"] = ADMIN_TOKEN
    if "ORT_DYLIB_PATH" not in env and (lib := _ort_dylib()):
        env["ORT_DYLIB_PATH"] = lib
    cmd = [str(binary), "serve", "--repository", "models/bundles", "--http-addr", http_addr,
           "--grpc-addr", grpc_addr, "--audit-log", str(audit_log)]
    log = logdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(proc, http_addr, log)
        yield http_addr, grpc_addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    check = subprocess.run([str(binary), "audit", "verify", str(audit_log)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr + _tail(log)
    records = [json.loads(line) for line in audit_log.read_text().splitlines() if line.strip()]
    ids = {r.get("request_id") for r in records}
    missing = [i for i in _grpc_request_ids if i not in ids]
    assert not missing, f"gRPC inferences without an audit record: {missing}"


@pytest.fixture(scope="module")
def grpc(servers):
    client = grpcclient.InferenceServerClient(url=servers[1])
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(servers):
    client = httpclient.InferenceServerClient(url=servers[0])
    yield client
    client.close()


def _grpc_infer(client, x: np.ndarray, request_id: str, outputs=("probabilities", "label"),
                model=MODEL, version=VERSION):
    inp = grpcclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outs = [grpcclient.InferRequestedOutput(o) for o in outputs]
    result = client.infer(model, [inp], model_version=version, outputs=outs,
                          request_id=request_id, headers={"x-request-id": request_id})
    _grpc_request_ids.append(request_id)
    return result


def _http_infer(client, x: np.ndarray):
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    outs = [httpclient.InferRequestedOutput(o, binary_data=False) for o in ("probabilities", "label")]
    return client.infer(MODEL, [inp], model_version=VERSION, outputs=outs)


def test_health_and_metadata(grpc):
    assert grpc.is_server_live()
    assert grpc.is_server_ready()
    assert grpc.is_model_ready(MODEL, VERSION)
    assert not grpc.is_model_ready("no-such-model")
    server = grpc.get_server_metadata(as_json=True)
    assert server["name"] == "nightingale"
    meta = grpc.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL
    assert "1" in meta["versions"]
    assert meta["inputs"][0]["name"] == "features"
    assert meta["inputs"][0]["datatype"] == "FP32"
    assert [int(d) for d in meta["inputs"][0]["shape"]] == [-1, 30]
    index = grpc.get_model_repository_index(as_json=True)
    assert any(m["name"] == MODEL and m["state"] == "READY" for m in index["models"])


def test_model_config_is_the_http_one_and_tritons_form(grpc, http):
    """gRPC ModelConfig: the configuration the HTTP route answers (itself checked against the
    bundle and onnxruntime in test_tritonclient.py), in Triton's protobuf message, and what
    Triton's own client reads from it."""
    from google.protobuf.json_format import MessageToDict

    from test_tritonclient import expected_model_config

    for version in ("", VERSION):
        message = grpc.get_model_config(MODEL, model_version=version).config
        # Proto3 JSON leaves out what is zero or empty (FORMAT_NONE, a scalar's dims) and
        # writes int64 as text: compare as numbers, with those put back.
        got = MessageToDict(message, preserving_proto_field_name=True)
        for t in got["input"]:
            t.setdefault("format", "FORMAT_NONE")
        for t in got["input"] + got["output"]:
            t["dims"] = [int(d) for d in t.get("dims", [])]
        got["dynamic_batching"]["max_queue_delay_microseconds"] = int(
            got["dynamic_batching"]["max_queue_delay_microseconds"])
        want = expected_model_config(version or "2")
        assert got == want, (got, want)
        assert got == http.get_model_config(MODEL, model_version=version)
    config = grpc.get_model_config(MODEL).config
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [30]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    with pytest.raises(InferenceServerException, match="unknown model"):
        grpc.get_model_config("no-such-model")


def test_infer_equals_http_and_onnxruntime(grpc, http, test_rows, reference):
    x, _ = test_rows
    # 64: the bundle's max_batch_size.
    for n, start in [(1, 0), (7, 3), (64, 10)]:
        batch = np.ascontiguousarray(x[start:start + n])
        got = _grpc_infer(grpc, batch, f"grpc-peer-{n}-{start}")
        want = _http_infer(http, batch)
        label, prob = reference(batch)
        p = got.as_numpy("probabilities")
        assert p.dtype == np.float32 and p.shape == (n, 2)
        # Over gRPC as over HTTP: the same server, the same numbers, bit for bit.
        np.testing.assert_array_equal(p, want.as_numpy("probabilities"))
        np.testing.assert_array_equal(got.as_numpy("label"), want.as_numpy("label"))
        # And onnxruntime's, within the engines' tolerance.
        np.testing.assert_allclose(p, prob, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(got.as_numpy("label"), label)
        response = got.get_response(as_json=True)
        assert response["model_name"] == MODEL and response["model_version"] == VERSION


def test_a_typed_request_is_answered_in_raw_contents_as_triton_answers(servers, test_rows, reference):
    """A client built from Triton's proto that sends typed `contents` (tritonclient itself
    sends raw) reads the answer as Triton gives it, in `raw_output_contents`: typed answers to
    typed requests could not be read by tritonclient.grpc's InferResult (a review's
    finding)."""
    import grpc as grpcio
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x, _ = test_rows
    batch = np.ascontiguousarray(x[:3])
    request = service_pb2.ModelInferRequest(model_name=MODEL, model_version=VERSION, id="typed")
    tensor = request.inputs.add(name="features", datatype="FP32", shape=list(batch.shape))
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    for name in ("probabilities", "label"):
        request.outputs.add(name=name)
    with grpcio.insecure_channel(servers[1]) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=(("x-request-id", "grpc-typed-peer"),), timeout=30)
    _grpc_request_ids.append("grpc-typed-peer")
    assert len(response.raw_output_contents) == 2
    result = grpcclient.InferResult(response)
    label, prob = reference(batch)
    np.testing.assert_allclose(result.as_numpy("probabilities"), prob, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(result.as_numpy("label"), label)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_inflated(grpc, test_rows, reference, algorithm):
    """tritonclient.grpc's `compression_algorithm` (as Triton accepts it, and as HTTP does)."""
    x, _ = test_rows
    batch = np.ascontiguousarray(x[:5])
    inp = grpcclient.InferInput("features", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    request_id = f"grpc-peer-{algorithm}"
    result = grpc.infer(MODEL, [inp], model_version=VERSION, request_id=request_id,
                        headers={"x-request-id": request_id}, compression_algorithm=algorithm)
    _grpc_request_ids.append(request_id)
    label, prob = reference(batch)
    np.testing.assert_allclose(result.as_numpy("probabilities"), prob, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(result.as_numpy("label"), label)


def test_classification_over_grpc(grpc, test_rows):
    x, _ = test_rows
    inp = grpcclient.InferInput("features", [2, 30], "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x[:2]))
    out = grpcclient.InferRequestedOutput("probabilities", class_count=1)
    result = grpc.infer(MODEL, [inp], model_version=VERSION, outputs=[out],
                        request_id="grpc-peer-class", headers={"x-request-id": "grpc-peer-class"})
    _grpc_request_ids.append("grpc-peer-class")
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 1)
    assert all(isinstance(v, bytes) and v.count(b":") >= 1 for v in top.ravel())


def test_errors_have_the_http_message_and_a_grpc_code(grpc, http, test_rows):
    x, _ = test_rows
    short = np.ascontiguousarray(x[:1, :29])
    with pytest.raises(InferenceServerException) as over_http:
        inp = httpclient.InferInput("features", [1, 29], "FP32")
        inp.set_data_from_numpy(short, binary_data=False)
        http.infer(MODEL, [inp], model_version=VERSION)
    with pytest.raises(InferenceServerException) as over_grpc:
        _grpc_infer(grpc, short, "grpc-peer-wrong-shape")
    assert over_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert over_grpc.value.message() == over_http.value.message()

    with pytest.raises(InferenceServerException) as unknown:
        inp = grpcclient.InferInput("features", [1, 30], "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x[:1]))
        grpc.infer("no-such-model", [inp])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"

    # An output asked into a shared-memory region (the extension is not served): refused over
    # both protocols, not answered inline while the client reads its region.
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        inp = module.InferInput("features", [1, 30], "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x[:1]))
        out = module.InferRequestedOutput("probabilities")
        out.set_shared_memory("region", 8)
        with pytest.raises(InferenceServerException) as shm:
            client.infer(MODEL, [inp], model_version=VERSION, outputs=[out])
        assert "shared memory is not supported" in shm.value.message(), shm.value.message()
        # An input in a region likewise (a red-team finding: its parameters were dropped).
        inp = module.InferInput("features", [1, 30], "FP32")
        inp.set_shared_memory("region", 120)
        with pytest.raises(InferenceServerException) as shm:
            client.infer(MODEL, [inp], model_version=VERSION)
        assert "shared memory is not supported" in shm.value.message(), shm.value.message()


def test_model_control_needs_the_admin_token(grpc):
    with pytest.raises(InferenceServerException) as refused:
        grpc.load_model(MODEL)
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "admin" in refused.value.message()
    grpc.load_model(MODEL, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert grpc.is_model_ready(MODEL, VERSION)


def test_statistics_count_grpc_inferences(grpc, test_rows):
    x, _ = test_rows
    _grpc_infer(grpc, np.ascontiguousarray(x[:3]), "grpc-peer-stats")
    stats = grpc.get_inference_statistics(MODEL, VERSION, as_json=True)
    (s,) = stats["model_stats"]
    assert s["name"] == MODEL and s["version"] == VERSION
    assert int(s["inference_count"]) >= 3
    assert int(s["inference_stats"]["success"]["count"]) >= 1


def test_calls_not_served_say_so(grpc, test_rows):
    """Streaming, trace and log settings and the shared-memory calls are UNIMPLEMENTED with
    the reason (a red-team finding: tonic's answer had an empty message, and the stream
    callback could not say why it failed)."""
    import queue

    for call in (grpc.get_trace_settings, grpc.get_log_settings,
                 grpc.get_system_shared_memory_status):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
        assert "not served by Nightingale" in refused.value.message(), refused.value.message()
    x, _ = test_rows
    errors: queue.Queue = queue.Queue()
    grpc.start_stream(callback=lambda result, error: errors.put(error))
    try:
        inp = grpcclient.InferInput("features", [1, 30], "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x[:1]))
        try:
            grpc.async_stream_infer(MODEL, [inp], model_version=VERSION)
        except InferenceServerException:
            pass  # the stream may already be closed with the error below
        error = errors.get(timeout=30)
        assert error is not None
        assert "ModelStreamInfer is not served" in error.message(), error.message()
    finally:
        grpc.stop_stream()


def test_aio_stream_infer_gets_the_reason(servers, test_rows):
    """tritonclient.grpc.aio's stream_infer, one request then the end of its stream: the
    answer names the call as not served every time (a review: answered before the stream was
    read, the server's RST_STREAM raced the client's send, and 18 of 30 calls reported
    INTERNAL "Internal error from Core" instead)."""
    import asyncio

    import tritonclient.grpc.aio as aioclient

    x, _ = test_rows

    async def once() -> str:
        client = aioclient.InferenceServerClient(url=servers[1])
        try:
            inp = aioclient.InferInput("features", [1, 30], "FP32")
            inp.set_data_from_numpy(np.ascontiguousarray(x[:1]))

            async def requests():
                yield {"model_name": MODEL, "inputs": [inp], "model_version": VERSION}

            try:
                async for result, error in client.stream_infer(requests()):
                    if error is not None:
                        return str(error)
                    return "an answer"
            except Exception as e:  # grpc.aio.AioRpcError or InferenceServerException
                return f"{type(e).__name__}: {e}"
            return "no answer"
        finally:
            await client.close()

    async def all_of_them():
        return [await asyncio.wait_for(once(), timeout=30) for _ in range(12)]

    outcomes = asyncio.run(all_of_them())
    wrong = [o for o in outcomes if "ModelStreamInfer is not served" not in o]
    assert not wrong, wrong


def test_http_extensions_not_served_say_so(http):
    """Over HTTP, tritonclient's shared-memory, trace and log calls are refused 501 with
    the reason, as gRPC's are UNIMPLEMENTED (they were a bare 404 "no such endpoint")."""
    calls = [
        http.get_system_shared_memory_status,
        lambda: http.register_system_shared_memory("r", "/r", 64),
        http.unregister_system_shared_memory,
        http.get_cuda_shared_memory_status,
        http.get_trace_settings,
        lambda: http.get_trace_settings(model_name=MODEL),
        http.get_log_settings,
        lambda: http.update_log_settings({"log_info": False}),
    ]
    for call in calls:
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "501", refused.value
        assert "not served by Nightingale" in refused.value.message(), refused.value.message()
