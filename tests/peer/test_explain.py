"""`POST /v2/models/{m}/explain` (issue 12) against real peers, through Triton's own client.

Requests are built by `tritonclient.http.InferenceServerClient.generate_request_body` and
answers read by `InferResult.from_response_body` (JSON and binary tensors), as a Triton user
would call an extension endpoint. Expected values come from peers, never from the server:

* KernelSHAP on `icu-mortality` (6 features: every coalition evaluated) equals the `shap`
  package's `KernelExplainer` on the same background, with onnxruntime as the model, within
  a tight tolerance; on `wdbc-malignancy` (30 features, sampled) it is close to shap's own
  sampled estimate and to the exact linear contributions computed with numpy from the ONNX
  graph's weights (a linear-logistic model in logit space is an additive game).
* `linear` equals wᵢ·sᵢ·(xᵢ − x̄ᵢ) computed with numpy from the ONNX graph.
* Occlusion on the image bundle equals the same occlusion computed with numpy + onnxruntime
  on the held-out test images.

The server runs with `--explain` (every method for every bundle) and its own audit trail,
whose hash chain is verified at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
import shap
import tritonclient.http as httpclient
from conftest import REPO, _free_port, _ort_dylib, wait_ready

BUNDLES = REPO / "models" / "bundles"


def bundle(name: str) -> dict:
    return tomllib.loads((BUNDLES / name / "bundle.toml").read_text())


@pytest.fixture(scope="module")
def url():
    binary = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    if not binary.is_absolute():
        binary = REPO / binary
    port = _free_port()
    addr = f"127.0.0.1:{port}"
    logdir = Path(tempfile.mkdtemp(prefix="nightingale-explain-"))
    log = logdir / "server.log"
    cmd = [str(binary), "serve", "--repository", "models/bundles", "--http-addr", addr,
           "--audit-log", str(logdir / "audit.jsonl"), "--data-dir", str(logdir / "data"),
           "--explain", "--explain-max-forward-passes", "20000"]
    env = dict(os.environ)
    if "ORT_DYLIB_PATH" not in env and _ort_dylib():
        env["ORT_DYLIB_PATH"] = _ort_dylib()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(proc, addr, log)
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    check = subprocess.run([str(binary), "audit", "verify", str(logdir / "audit.jsonl")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def explain(url: str, model: str, x: np.ndarray, parameters: dict, *, input_name: str = "features",
            outputs: list[str] | None = None, binary: bool = False,
            version: str | None = None) -> httpclient.InferResult:
    inp = httpclient.InferInput(input_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32), binary_data=binary)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs] if outputs else None
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=outs, parameters=parameters)
    headers = {}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/explain"
    r = requests.post(f"http://{url}{path}", data=body, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    header_length = r.headers.get("Inference-Header-Content-Length")
    return httpclient.InferResult.from_response_body(
        r.content, header_length=int(header_length) if header_length else None)


def positive_column(b: dict) -> int:
    out = next(o for o in b["outputs"] if o["name"] == "probabilities")
    return out["labels"].index(out["positive_label"])


def linear_form(model: Path, column: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset, scale, weight) of Scaler → LinearClassifier, read with the onnx package."""
    g = onnx.load(str(model)).graph
    attrs = {n.op_type: {a.name: a for a in n.attribute} for n in g.node}
    offset = np.array(attrs["Scaler"]["offset"].floats, dtype=np.float64)
    scale = np.array(attrs["Scaler"]["scale"].floats, dtype=np.float64)
    coef = np.array(attrs["LinearClassifier"]["coefficients"].floats, dtype=np.float64)
    coef = coef.reshape(-1, len(offset))
    return offset, scale, coef[column]


def ort_log_odds(model: Path, column: int):
    """The model's log-odds of `column` with onnxruntime: ln p_target − ln p_other, each
    clamped at 1e-12, as docs/explain.md defines the logit link for two classes."""
    sess = ort.InferenceSession(str(model))

    def f(X: np.ndarray) -> np.ndarray:
        p = sess.run(["probabilities"], {"features": np.asarray(X, dtype=np.float32)})[0].astype(np.float64)
        p = np.maximum(p, 1e-12)
        return np.log(p[:, column]) - np.log(p[:, 1 - column])

    return f


def test_kernel_shap_equals_the_shap_package_with_every_coalition(url):
    b = bundle("icu-mortality")
    background = np.array(b["explain"]["background"], dtype=np.float32)
    column = positive_column(b)
    x = background[[0, 7, 19]] * np.float32(1.05)
    res = explain(url, "icu-mortality", x, {"method": "kernel_shap"})
    phi = res.as_numpy("probabilities_attribution")
    out = res.get_output("probabilities_attribution")
    assert phi.shape == (3, 6) and phi.dtype == np.float64
    assert out["parameters"]["link"] == "logit"
    # 6 features: 62 coalitions × 32 background rows, plus the background itself.
    assert out["parameters"]["forward_passes"] == 3 * 32 * 63
    bases = [float(v) for v in out["parameters"]["base_value"].split(",")]

    f = ort_log_odds(BUNDLES / "icu-mortality" / "1" / "model.onnx", column)
    explainer = shap.KernelExplainer(f, background.astype(np.float64), link="identity")
    want = explainer.shap_values(x.astype(np.float64), nsamples=62, l1_reg=False, silent=True)
    np.testing.assert_allclose(phi, want, atol=2e-4, rtol=0)
    np.testing.assert_allclose(bases, [explainer.expected_value] * 3, atol=2e-4)
    # Efficiency against the server's own prediction.
    p = res.as_numpy("probabilities").astype(np.float64)
    log_odds = np.log(p[:, column]) - np.log(p[:, 1 - column])
    np.testing.assert_allclose(phi.sum(axis=1), log_odds - np.array(bases), atol=1e-6)


def test_kernel_shap_on_wdbc_is_close_to_shap_and_to_the_exact_linear_values(url):
    b = bundle("wdbc-malignancy")
    background = np.array(b["explain"]["background"], dtype=np.float32)
    column = positive_column(b)
    means = np.array(b["attribution"]["means"])
    x = (means + 0.3 * (background[0] - means)).astype(np.float32)[None, :]
    res = explain(url, "wdbc-malignancy", x, {"method": "kernel_shap", "samples": 2000, "seed": 5},
                  version="1", outputs=["probabilities", "probabilities_attribution"], binary=True)
    phi = res.as_numpy("probabilities_attribution")[0]
    assert res.get_output("probabilities_attribution")["parameters"]["forward_passes"] == 32 * 2001

    offset, scale, w = linear_form(BUNDLES / "wdbc-malignancy" / "1" / "model.onnx", column)
    exact = w * scale * (x[0].astype(np.float64) - background.astype(np.float64).mean(axis=0))
    # Up to the FP32 rounding of the model's probabilities (rows beyond logit ±17 round to
    # within an ulp of 0 or 1 in both columns): see tests/explain.rs.
    np.testing.assert_allclose(phi, exact, atol=0.03, rtol=0.02)

    f = ort_log_odds(BUNDLES / "wdbc-malignancy" / "1" / "model.onnx", column)
    explainer = shap.KernelExplainer(f, background.astype(np.float64), link="identity")
    want = explainer.shap_values(x.astype(np.float64), nsamples=2048, l1_reg=False, silent=True)[0]
    # Both sampled (2^30 coalitions): close, not equal.
    scale_phi = np.abs(want).max()
    assert np.abs(phi - want).max() < 0.1 * scale_phi, (phi, want)
    assert np.corrcoef(phi, want)[0, 1] > 0.99


@pytest.mark.parametrize("name", ["icu-mortality", "pima-diabetes", "wdbc-malignancy"])
def test_linear_equals_the_onnx_weights(url, name):
    b = bundle(name)
    column = positive_column(b)
    means = np.array(b["attribution"]["means"])
    background = np.array(b["explain"]["background"], dtype=np.float32)
    x = background[:4]
    # The other class first, then the default (positive) one: each its own form (a red-team
    # finding: the first request's class was cached for the model version and served every
    # later request, the signs of every linear explanation and risk card reversed).
    other = next(o for o in b["outputs"] if o["name"] == "probabilities")["labels"][1 - column]
    bases = {}
    for target, col in [(other, 1 - column), (None, column)]:
        params = {"method": "linear", **({"target": target} if target else {})}
        res = explain(url, name, x, params, version="1")
        got = res.as_numpy("probabilities_attribution")
        offset, scale, w = linear_form(BUNDLES / name / "1" / "model.onnx", col)
        want = w * scale * (x.astype(np.float64) - means)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        out = res.get_output("probabilities_attribution")
        bases[col] = [float(v) for v in out["parameters"]["base_value"].split(",")]
    # Two classes: the log-odds of one are the other's negated, at the reference point too.
    np.testing.assert_allclose(bases[column], [-v for v in bases[1 - column]], rtol=1e-12)


def numpy_occlusion(sess, image: np.ndarray, output: str, column: int, patch: int, stride: int):
    """Occlusion as docs/explain.md defines it, with onnxruntime as the model."""
    _, h, w = image.shape
    ys = list(range(0, h - patch + 1, stride))
    xs = list(range(0, w - patch + 1, stride))
    ys += [h - patch] if ys[-1] != h - patch else []
    xs += [w - patch] if xs[-1] != w - patch else []
    name = sess.get_inputs()[0].name
    base = sess.run([output], {name: image[None]})[0][0, column]
    copies = []
    for y in ys:
        for x0 in xs:
            c = image.copy()
            c[:, y:y + patch, x0:x0 + patch] = 0.0
            copies.append(c)
    scores = np.concatenate([sess.run([output], {name: np.stack(copies[i:i + 16])})[0][:, column]
                             for i in range(0, len(copies), 16)])
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    k = 0
    for y in ys:
        for x0 in xs:
            total[y:y + patch, x0:x0 + patch] += base - scores[k]
            count[y:y + patch, x0:x0 + patch] += 1
            k += 1
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


@pytest.mark.parametrize("binary", [False, True])
def test_occlusion_equals_numpy_and_onnxruntime_on_the_image_bundle(url, orientation_testdata, binary):
    images = np.load(orientation_testdata / "images.npy")[[0, 5]].astype(np.float32)
    res = explain(url, "image-orientation", images, {"method": "occlusion", "patch": 48, "stride": 32},
                  input_name="image", binary=binary,
                  outputs=["misoriented", "misoriented_saliency"])
    sal = res.as_numpy("misoriented_saliency")
    assert sal.shape == (2, 224, 224) and sal.dtype == np.float32
    params = res.get_output("misoriented_saliency")["parameters"]
    assert params["method"] == "occlusion" and params["target"] == "misoriented,misoriented"
    sess = ort.InferenceSession(str(BUNDLES / "image-orientation" / "1" / "model.onnx"))
    for i in range(2):
        want = numpy_occlusion(sess, images[i], "misoriented", 1, 48, 32)
        np.testing.assert_allclose(sal[i], want, atol=2e-4, rtol=0)
    # The prediction itself is returned unchanged beside it.
    p = sess.run(["misoriented"], {"image": images})[0]
    np.testing.assert_allclose(res.as_numpy("misoriented"), p, atol=1e-5)


def test_errors_reach_a_triton_client(url):
    inp = httpclient.InferInput("features", [1, 30], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 30), dtype=np.float32), binary_data=True)
    for parameters, why in [({"method": "occlusion"}, "explains images"),
                            ({"method": "kernel_shap", "samples": 100000}, "the budget is 65536"),
                            ({"method": "saliency"}, "unknown explanation method")]:
        body, json_size = httpclient.InferenceServerClient.generate_request_body([inp], parameters=parameters)
        r = requests.post(f"http://{url}/v2/models/wdbc-malignancy/explain", data=body,
                          headers={"Inference-Header-Content-Length": str(json_size)}, timeout=30)
        assert r.status_code == 400, r.text
        assert why in r.json()["error"], r.text


def open_size_bundle(repo: Path, *, batching: str = "", methods: str = '"occlusion"') -> None:
    """A bundle whose image input has open height and width ([-1, 1, -1, -1]): two scores
    from the image's mean and maximum, soft-maxed (built here with onnx's helper)."""
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "h", "w"])
    prob = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", 2])
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
        helper.make_node("ReduceMax", ["x", "axes"], ["max"], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "one"], ["m2"]),
        helper.make_node("Unsqueeze", ["max", "one"], ["x2"]),
        helper.make_node("Concat", ["m2", "x2"], ["both"], axis=1),
        helper.make_node("Softmax", ["both"], ["prob"], axis=1),
    ]
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "open", [x], [prob], initializer=[axes, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = repo / "open-size" / "1"
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    import hashlib
    sha = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    (repo / "open-size" / "bundle.toml").write_text(f'''format_version = 1
name = "open-size"
task = "image-classification"
description = "test: an image model of any size"
platform = "onnx"
backend = "any"
{batching}
[version_policy]
policy = "latest"
latest = 1

[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 1, -1, -1]
description = "an image"

[[outputs]]
name = "prob"
datatype = "FP32"
shape = [-1, 2]
description = "two scores"
labels = ["mean", "max"]

[explain]
methods = [{methods}]
max_forward_passes = 65536

[versions.1]
description = "test"
created = "2026-12-06"

[versions.1.files]
"model.onnx" = "{sha}"
''')


def serve_repo(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`serve` of the repository `tmp_path/repo`, ready: (the process, its address)."""
    binary = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    if not binary.is_absolute():
        binary = REPO / binary
    addr = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(binary), "serve", "--repository", str(tmp_path / "repo"),
                                 "--http-addr", addr, "--data-dir", str(tmp_path / "data"),
                                 *extra],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, addr, log)
    except BaseException:
        proc.kill()
        raise
    return proc, addr


def test_explanations_at_once_share_the_models_queue(tmp_path):
    """A review's finding: each explanation's batches were sized for half the model's
    `queue_bytes`, two in flight, so two explanations at once filled the queue and the
    second was refused 503 after its first forward passes. The explanations that may run at
    once (`--explain-max-concurrent`) now take half the queue together."""
    open_size_bundle(tmp_path / "repo", methods='"occlusion", "rise"', batching="""
[batching]
max_batch_size = 64
max_queue_delay_us = 1000
queue_bytes = 4194304
""")
    proc, addr = serve_repo(tmp_path, "--explain", "--explain-max-concurrent", "2")
    try:
        # 256 KiB images: 8 a batch (before: 16 of the 4 MiB queue per explanation, in
        # flight), 256 passes each, two at a time, three times over.
        rng = np.random.default_rng(7)
        image = rng.random((1, 1, 256, 256), dtype=np.float32)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            for round in range(3):
                answers = list(pool.map(
                    lambda seed: explain(addr, "open-size", image,
                                         {"method": "rise", "samples": 256, "seed": seed},
                                         input_name="x", binary=True),
                    [2 * round, 2 * round + 1]))
                for res in answers:
                    assert res.as_numpy("prob_saliency").shape == (1, 256, 256)
        records = [json.loads(line) for line in
                   (tmp_path / "data" / "audit" / "audit.jsonl").read_text().splitlines()]
        explains = [r for r in records if r["kind"] == "explain"]
        assert len(explains) == 6 and all(r["outcome"] == "ok" for r in explains), explains
        assert all(r["detail"].startswith("method=rise forward_passes=256") for r in explains)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_heatmaps_of_a_model_of_any_image_size_are_bounded(tmp_path):
    """A red-team finding: a model with open height and width drew a heatmap of whatever size
    it was sent (8 MB of a 2,097,152 x 1 image took 3.9 GB and a minute, and stalled every
    other request): heatmaps over 4 Mi pixels in all are refused with the reason, before
    any forward pass when the images alone are too large, and the server stays live."""
    open_size_bundle(tmp_path / "repo")
    proc, addr = serve_repo(tmp_path)
    try:
        # An ordinary size: a PNG as wide as the caption, the saliency where onnxruntime
        # puts it (the maximum's pixel is the only one whose occlusion moves "max").
        image = np.zeros((1, 1, 32, 48), dtype=np.float32)
        image[0, 0, 20, 30] = 5.0
        res = explain(addr, "open-size", image, {"method": "occlusion", "patch": 1,
                                                 "target": 1, "heatmap": True},
                      input_name="x", binary=True,
                      outputs=["prob", "prob_saliency", "prob_heatmap"])
        png = res.as_numpy("prob_heatmap")[0]
        assert bytes(png[:8]) == b"\x89PNG\r\n\x1a\n"
        sal = res.as_numpy("prob_saliency")[0]
        assert np.unravel_index(np.argmax(sal), sal.shape) == (20, 30)
        sess = ort.InferenceSession(str(tmp_path / "repo" / "open-size" / "1" / "model.onnx"))
        np.testing.assert_allclose(res.as_numpy("prob"), sess.run(["prob"], {"x": image})[0],
                                   atol=1e-6)

        def refused(shape: tuple[int, ...]) -> str:
            inp = httpclient.InferInput("x", list(shape), "FP32")
            inp.set_data_from_numpy(np.ones(shape, dtype=np.float32), binary_data=True)
            body, json_size = httpclient.InferenceServerClient.generate_request_body(
                [inp], parameters={"method": "occlusion", "patch": 4096, "heatmap": True})
            r = requests.post(f"http://{addr}/v2/models/open-size/explain", data=body,
                              headers={"Inference-Header-Content-Length": str(json_size)},
                              timeout=60)
            assert r.status_code == 400, r.text
            return r.json()["error"]
        # The images alone: refused before any forward pass.
        assert "at most 4194304" in refused((1, 1, 2100, 2100))
        # Small images, each drawn as wide as its caption (1 x 262,144: ~600 x 262,144).
        assert "at most 4194304" in refused((1, 1, 262144, 1))
        assert "at most 4194304" in refused((1, 1, 1, 2097152))
        r = requests.get(f"http://{addr}/v2/health/live", timeout=10)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
