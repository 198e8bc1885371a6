"""Image bundles (task image-classification): the server against onnxruntime on the
whole held-out test split, through Triton's own client.

The test split of `image-orientation` is not committed (38 MB of tensors); it is rebuilt
by the training script's `--testdata-only` from the real DICOM files in the pydicom,
pydicom-data and deid-data packages (crops of 4 held-out images in all 8 orientations,
preprocessed at full resolution as bundle.toml declares).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "models" / "bundles"
ATOL = 1e-5
BATCH = 16


def _manifest(name: str) -> dict:
    return tomllib.loads((BUNDLES / name / "bundle.toml").read_text(encoding="utf-8"))


def _image_bundles() -> list[str]:
    return sorted(
        p.parent.name for p in BUNDLES.glob("*/bundle.toml")
        if tomllib.loads(p.read_text(encoding="utf-8"))["task"] == "image-classification"
    )


def test_there_is_an_image_bundle():
    assert "image-orientation" in _image_bundles()


@pytest.fixture(scope="session")
def orientation_split(orientation_testdata):
    folder = orientation_testdata
    x = np.load(folder / "images.npy")
    y = np.load(folder / "labels.npy")
    meta = json.loads((folder / "samples.json").read_text())
    return x, y, meta


def test_metadata_declares_the_image_input_and_preprocessing(client):
    manifest = _manifest("image-orientation")
    md = client.get_model_metadata("image-orientation")
    assert md["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 224, 224]}]
    assert {o["name"] for o in md["outputs"]} == {"orientation", "misoriented"}
    pre = md["parameters"]["preprocessing"]
    assert pre["size"] == [224, 224] and pre["input"] == "image"
    assert pre["window"] == manifest["preprocessing"]["window"]
    assert md["parameters"]["labels"]["misoriented"] == ["correct", "misoriented"]


def test_whole_test_split_matches_onnxruntime(client, orientation_split):
    x, y, meta = orientation_split
    name = "image-orientation"
    manifest = _manifest(name)
    assert x.shape[1:] == (1, 224, 224) and x.dtype == np.float32 and len(x) == len(y) == len(meta)
    sess = ort.InferenceSession(str(BUNDLES / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    worst = 0.0
    predicted = []
    p_mis = []
    for start in range(0, len(x), BATCH):
        xb = np.ascontiguousarray(x[start : start + BATCH])
        inp = httpclient.InferInput("image", list(xb.shape), "FP32")
        inp.set_data_from_numpy(xb, binary_data=True)
        outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("orientation", "misoriented")]
        res = client.infer(name, [inp], outputs=outs)
        got_o, got_m = res.as_numpy("orientation"), res.as_numpy("misoriented")
        want_o, want_m = sess.run(["orientation", "misoriented"], {"image": xb})
        assert got_o.shape == (len(xb), 8) and got_m.shape == (len(xb), 2)
        worst = max(worst, float(np.max(np.abs(got_o - want_o))), float(np.max(np.abs(got_m - want_m))))
        np.testing.assert_allclose(got_o.sum(axis=1), 1.0, atol=1e-5)
        predicted.append(got_o.argmax(axis=1))
        p_mis.append(got_m[:, 1])
    print(f"{name}: {len(x)} images, max |server - onnxruntime| = {worst:.2e}")
    assert worst <= ATOL, worst

    # The served model reproduces the accuracy its card reports on this split.
    metrics = json.loads((BUNDLES / name / "1" / "metrics.json").read_text())
    accuracy = float(np.mean(np.concatenate(predicted) == y))
    assert abs(accuracy - metrics["test"]["accuracy_8_way"]["value"]) <= 1.0 / len(y) + 1e-9, accuracy
    threshold = next(t["value"] for t in manifest["thresholds"] if t["output"] == "misoriented")
    flagged = np.concatenate(p_mis) >= threshold
    tp = int(np.sum(flagged & (y != 0)))
    assert abs(tp - metrics["test"]["misoriented"]["at_threshold"]["tp"]) <= 1, tp


def test_wrong_image_size_is_a_400_with_the_reason(client):
    x = np.zeros((1, 1, 128, 128), dtype=np.float32)
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(InferenceServerException) as err:
        client.infer("image-orientation", [inp])
    assert err.value.status() == "400", err.value
    assert err.value.message() == (
        'input "image" has shape [1, 1, 128, 128] but the model expects [-1, 1, 224, 224] (-1 = any size)'
    ), err.value
