"""The lesion-detection reference bundle: its outputs against onnxruntime on the whole
held-out test split, and its explanations checked against the known answer.

The test split is not committed (tensors of real images from PyPI packages); it is rebuilt by
`models/train/lesion_detection.py --testdata-only` (numpy + pydicom) from the DICOM files in
the pydicom, pydicom-data and deid-data packages, with the simulated lesions and their masks.

- The served model equals onnxruntime on all 300 test images and reproduces the AUROC its
  card reports.
- **Pointing game** (issue 12): occlusion through `/explain` (Triton's client, binary)
  equals the numpy + onnxruntime occlusion of the training script on every explained image,
  and its maximum falls inside the inserted lesion's (dilated) mask far more often than a
  random point would (exact Poisson-binomial tail), as often as the reference finds.
- **Model randomisation** (Adebayo et al., "Sanity Checks for Saliency Maps", 2018): the same
  explanation of a copy of the model whose weights are redrawn at random is a different map
  (median Spearman rank correlation with the trained model's maps well under 0.5) that no
  longer finds the lesions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
import tritonclient.http as httpclient
from onnx import numpy_helper
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from conftest import REPO, _free_port, wait_ready

sys.path.insert(0, str(REPO / "models" / "train"))
import lesion_detection as ld  # noqa: E402  (the training script's occlusion and pointing rule)

NAME = "lesion-detection"
BUNDLE = REPO / "models" / "bundles" / NAME
# Lesions explained per check: the first EXPLAINED positives of each test source.
EXPLAINED_PER_SOURCE = 4
RANDOM_NAME = "lesion-detection-randomised"


@pytest.fixture(scope="module")
def lesion_split(tmp_path_factory):
    folder = BUNDLE / "testdata"
    if not (folder / "images.npy").exists():
        folder = tmp_path_factory.mktemp("lesion-testdata")
        proc = subprocess.run(
            [sys.executable, str(REPO / "models/train/lesion_detection.py"), "--testdata-only", "--out", str(folder)],
            cwd=REPO, capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, f"--testdata-only failed:\n{proc.stdout}\n{proc.stderr}"
    x = np.load(folder / "images.npy")
    y = np.load(folder / "labels.npy")
    masks = np.load(folder / "masks.npy")
    import csv
    with open(folder / "meta.csv", newline="") as f:
        meta = list(csv.DictReader(f))
    # The rebuilt split is the one the card was measured on.
    metrics = json.loads((BUNDLE / "1" / "metrics.json").read_text())
    assert hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() == metrics["testdata"]["sha256_images"]
    return x, y, masks, meta


def _randomised_model(path: Path) -> None:
    """The bundle's ONNX model with every weight and bias redrawn from a normal distribution
    of the same standard deviation (seeded): the architecture kept, everything learnt gone."""
    model = onnx.load(str(BUNDLE / "1" / "model.onnx"))
    rng = np.random.default_rng(20181027)
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype != np.float32:
            continue
        r = rng.normal(0.0, float(a.std()) + 1e-3, a.shape).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(r, init.name))
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """A server on a repository of the bundle and its randomised copy (unsigned, its
    checksum rewritten; the self-test is dropped since its reference outputs are the trained
    model's)."""
    binary = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    if not binary.is_absolute():
        binary = REPO / binary
    work = tmp_path_factory.mktemp("lesion-server")
    repo = work / "models"
    repo.mkdir()
    shutil.copytree(BUNDLE, repo / NAME, ignore=shutil.ignore_patterns("testdata"))
    rnd = repo / RANDOM_NAME
    shutil.copytree(BUNDLE, rnd, ignore=shutil.ignore_patterns("testdata", "*.minisig", "selftest.json"))
    _randomised_model(rnd / "1" / "model.onnx")
    text = (rnd / "bundle.toml").read_text()
    manifest = tomllib.loads(text)
    old = manifest["versions"]["1"]["files"]["model.onnx"]
    new = hashlib.sha256((rnd / "1" / "model.onnx").read_bytes()).hexdigest()
    text = text.replace(f'name = "{NAME}"', f'name = "{RANDOM_NAME}"', 1).replace(old, new)
    text = text.replace('"selftest.json" = "' + manifest["versions"]["1"]["files"]["selftest.json"] + '"\n', "")
    start = text.index("[selftest]")
    end = text.index("\n[", start + 1)
    text = text[:start] + text[end + 1:]
    (rnd / "bundle.toml").write_text(text)

    port = _free_port()
    addr = f"127.0.0.1:{port}"
    log = work / "server.log"
    cmd = [str(binary), "serve", "--repository", str(repo), "--http-addr", addr,
           "--audit-log", str(work / "audit.jsonl"), "--data-dir", str(work / "data")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT)
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
    check = subprocess.run([str(binary), "audit", "verify", str(work / "audit.jsonl")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def _explain(url: str, model: str, image: np.ndarray) -> np.ndarray:
    """Occlusion of P(present) as the card's pointing game computes it, through /explain."""
    x = np.ascontiguousarray(image[None].astype(np.float32))
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    outs = [httpclient.InferRequestedOutput("lesion_saliency", binary_data=True)]
    parameters = {"method": "occlusion", "target": "present", "patch": ld.OCC_PATCH,
                  "stride": ld.OCC_STRIDE, "baseline": ld.OCC_BASELINE}
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=outs, parameters=parameters)
    r = requests.post(f"http://{url}/v2/models/{model}/explain", data=body,
                      headers={"Inference-Header-Content-Length": str(json_size)}, timeout=300)
    assert r.status_code == 200, r.text
    res = httpclient.InferResult.from_response_body(
        r.content, header_length=int(r.headers["Inference-Header-Content-Length"]))
    params = res.get_output("lesion_saliency")["parameters"]
    assert params["method"] == "occlusion" and params["target"] == "present", params
    sal = res.as_numpy("lesion_saliency")
    assert sal.shape == (1, 128, 128) and sal.dtype == np.float32
    return sal[0].astype(np.float64)


def _explained(y: np.ndarray, meta: list[dict]) -> list[int]:
    out = []
    for source in sorted({m["source"] for m in meta}):
        out += [i for i in np.flatnonzero(y == 1) if meta[i]["source"] == source][:EXPLAINED_PER_SOURCE]
    return out


def test_whole_test_split_matches_onnxruntime_and_the_card(url, lesion_split):
    x, y, _, _ = lesion_split
    sess = ort.InferenceSession(str(BUNDLE / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    client = httpclient.InferenceServerClient(url=url, network_timeout=300)
    got = []
    for start in range(0, len(x), 32):
        xb = np.ascontiguousarray(x[start:start + 32])
        inp = httpclient.InferInput("image", list(xb.shape), "FP32")
        inp.set_data_from_numpy(xb, binary_data=True)
        res = client.infer(NAME, [inp], outputs=[httpclient.InferRequestedOutput("lesion", binary_data=True)])
        p = res.as_numpy("lesion")
        np.testing.assert_allclose(p, sess.run(["lesion"], {"image": xb})[0], atol=1e-5, rtol=0)
        got.append(p[:, 1])
    auroc = roc_auc_score(y, np.concatenate(got))
    metrics = json.loads((BUNDLE / "1" / "metrics.json").read_text())
    assert abs(auroc - metrics["test"]["auroc"]["value"]) < 1e-3, auroc
    # Clearly better than chance on held-out images (the bar), with its CI.
    assert metrics["test"]["auroc"]["ci95"][0] > 0.5


@pytest.fixture(scope="module")
def trained_maps(url, lesion_split) -> dict[int, np.ndarray]:
    """The served model's occlusion maps of the explained lesions (made once)."""
    x, y, _, meta = lesion_split
    return {i: _explain(url, NAME, x[i]) for i in _explained(y, meta)}


def test_pointing_game_through_explain(lesion_split, trained_maps):
    x, y, masks, meta = lesion_split
    sess = ort.InferenceSession(str(BUNDLE / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    hits, ref_hits, fractions = 0, 0, []
    for i, sal in trained_maps.items():
        want, _ = ld.occlusion_saliency(sess, x[i])
        np.testing.assert_allclose(sal, want, atol=2e-5, rtol=0)
        region = ld.dilate(masks[i], ld.DILATE_PX)
        hits += bool(region[ld.saliency_peak(sal)])
        ref_hits += bool(region[ld.saliency_peak(want)])
        fractions.append(float(region.mean()))
    n = len(fractions)
    p_random = ld.poisson_binomial_tail(np.array(fractions), hits)
    print(f"pointing game through /explain: {hits}/{n} hits (reference {ref_hits}/{n}); "
          f"random points expect {sum(fractions):.2f}, P(>= {hits}) = {p_random:.1e}")
    # Plateau ties may fall differently at FP32 rounding: at most one point apart.
    assert abs(hits - ref_hits) <= 1
    assert p_random < 1e-6 and hits >= n // 3, (hits, n)


def test_randomised_weights_change_the_map(url, lesion_split, trained_maps):
    x, y, masks, meta = lesion_split
    rhos, hits, random_hits = [], 0, 0
    for i, trained in trained_maps.items():
        randomised = _explain(url, RANDOM_NAME, x[i])
        rhos.append(spearmanr(trained.ravel(), randomised.ravel()).statistic)
        region = ld.dilate(masks[i], ld.DILATE_PX)
        hits += bool(region[ld.saliency_peak(trained)])
        random_hits += bool(region[ld.saliency_peak(randomised)])
    print(f"Spearman(trained, randomised) median {np.median(rhos):.2f}; hits {hits} vs {random_hits}")
    assert np.median(rhos) < 0.5, rhos
    assert random_hits < hits / 2, (hits, random_hits)


def test_heatmap_png_through_triton_client(url, lesion_split):
    """`parameters.heatmap`: one PNG per row as a BYTES output that tritonclient reads."""
    import struct
    x, y, _, meta = lesion_split
    i = _explained(y, meta)[0]
    xb = np.ascontiguousarray(x[[i, i]].astype(np.float32))
    inp = httpclient.InferInput("image", list(xb.shape), "FP32")
    inp.set_data_from_numpy(xb, binary_data=True)
    outs = [httpclient.InferRequestedOutput(n, binary_data=True)
            for n in ("lesion", "lesion_saliency", "lesion_heatmap")]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=outs, parameters={"method": "occlusion", "patch": 32, "stride": 32, "heatmap": True})
    r = requests.post(f"http://{url}/v2/models/{NAME}/explain", data=body,
                      headers={"Inference-Header-Content-Length": str(json_size)}, timeout=300)
    assert r.status_code == 200, r.text
    res = httpclient.InferResult.from_response_body(
        r.content, header_length=int(r.headers["Inference-Header-Content-Length"]))
    assert res.get_output("lesion_heatmap")["parameters"]["content_type"] == "image/png"
    pngs = res.as_numpy("lesion_heatmap")
    assert pngs.shape == (2,)
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert width >= 128 and height > 128, (width, height)
    assert pngs[0] == pngs[1]  # the same image and map make the same picture
    # Asked of a table, or not a boolean: a 400 with the reason.
    r = requests.post(f"http://{url}/v2/models/{NAME}/explain",
                      json={"inputs": [{"name": "image", "shape": [1, 1, 128, 128], "datatype": "FP32",
                                        "data": [0.0] * 128 * 128}],
                            "parameters": {"method": "occlusion", "heatmap": "yes"}}, timeout=60)
    assert r.status_code == 400 and "heatmap" in r.text, r.text
