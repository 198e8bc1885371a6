"""`nightingale models init` on models of the kinds users bring, checked against onnxruntime.

The models come from models/train/make_init_fixtures.py, generated into a temporary folder
at the start (about 10 s): scikit-learn estimators exported by skl2onnx (logistic regression
with and without ZipMap, random forest, gradient boosting, MLP, SVC, an imputer + scaler
pipeline, two regressors) and torch.onnx.export-style graphs built with onnx.helper (MLPs with
`input.1` / `onnx::Gemm_0` inputs, a dynamic `batch_size` axis or a fixed batch of 1, an output
declared with the wrong shape or none, a Conv/BatchNorm/GlobalAveragePool CNN). torch itself is
not installed (see the generator's docstring).

For each model, init scaffolds a bundle (with the model's sample rows when it is tabular), and:

* the bundle's inputs and outputs are onnxruntime's: names and datatypes from
  `get_inputs()`/`get_outputs()` (ZipMap's sequence of maps is served dense: FP32 [-1, C]),
  input shapes from `get_inputs()` (symbolic dimensions as -1), output shapes from what
  onnxruntime really returns at two batch sizes (a size that changes with the batch is -1),
  not from what the file declares;
* where the file's declaration differs from that, init printed a warning naming the tensor and
  both shapes; where it does not, no warning;
* `nightingale models check` passes on the bundle and lists each TODO field as a warning;
* the self-test's reference outputs equal onnxruntime's on the same inputs within the
  bundle's tolerance, and `models/train/selftest.py --reuse-inputs --update-manifest`
  replaces them with onnxruntime's and the bundle still checks;
* a server started on the scaffolded repository answers the sample rows as onnxruntime does.

Hostile input (not ONNX, truncated, too large, an operator no engine here knows, bad names, an
existing bundle, malformed CSVs, a sample for an image model) is refused with a clear message,
and nothing is left in the repository.

The engine is the one NIGHTINGALE_BACKEND names (scripts/test.sh runs this file with tract and
with ort); the binary is NIGHTINGALE_BIN (default target/debug/nightingale).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "models" / "train" / "make_init_fixtures.py"
SELFTEST_PY = REPO / "models" / "train" / "selftest.py"
BACKEND = os.environ.get("NIGHTINGALE_BACKEND", "tract")
READY_TIMEOUT_S = 60.0
TODO_FIELDS = [
    "description",
    "intended_use.summary",
    "intended_use.users",
    "intended_use.limitations",
    "provenance.training_data",
    "provenance.data_licence",
    "provenance.model_licence",
    "provenance.training_script",
]

# The generator's fixtures (checked against its fixtures.json below).
SKLEARN = [
    "skl_logreg", "skl_logreg_zipmap", "skl_random_forest", "skl_gradient_boosting", "skl_mlp",
    "skl_svc", "skl_imputer_pipeline", "skl_linear_regression", "skl_rf_regressor",
]
TORCH = [
    "torch_mlp", "torch_mlp_gemm_input", "torch_mlp_fixed_batch", "torch_mlp_wrong_output_shape",
    "torch_mlp_no_output_shape", "torch_cnn",
]
# Where the file declares something else than what runs: tensor -> (declared, runs) as printed.
DISAGREE = {
    "skl_logreg_zipmap": ("output_probability", "not a tensor", "FP32 [-1, 2]"),
    "torch_mlp_wrong_output_shape": ("output", "FP32 [batch_size, 5]", "FP32 [-1, 3]"),
    "torch_mlp_no_output_shape": ("output", "FP32 (no shape)", "FP32 [-1, 3]"),
}
# ONNX Runtime (the ort engine) has no map values and Nightingale's ort backend serves tensors
# only: a ZipMap model is refused there (tract serves it dense).
REFUSED = {"ort": {"skl_logreg_zipmap": "not a tensor"}}.get(BACKEND, {})
MODELS = [m for m in SKLEARN + TORCH if m not in REFUSED]

_ORT_TYPES = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int16)": "INT16",
    "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def _binary() -> Path:
    b = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    b = b if b.is_absolute() else REPO / b
    if not b.exists():
        pytest.fail(f"Nightingale binary not found at {b} (cargo build, or set NIGHTINGALE_BIN)", pytrace=False)
    return b


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["NIGHTINGALE_BACKEND"] = BACKEND
    env.setdefault("NIGHTINGALE_LOG", "warn")
    if "ORT_DYLIB_PATH" not in env:
        libs = sorted((Path(ort.__file__).resolve().parent / "capi").glob("libonnxruntime.so*"))
        if libs:
            env["ORT_DYLIB_PATH"] = str(libs[-1])
    return env


def _run(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(_binary()), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=_env(), timeout=timeout)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init-fixtures")
    proc = subprocess.run([sys.executable, str(GENERATOR), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = [f["name"] for f in json.loads((out / "fixtures.json").read_text())]
    assert listed == SKLEARN + TORCH
    return out


@pytest.fixture(scope="module")
def scaffolded(fixtures, tmp_path_factory):
    """Runs init on every fixture into one repository: name -> CompletedProcess."""
    repo = tmp_path_factory.mktemp("init-repo") / "repository"
    results = {}
    for name in SKLEARN + TORCH:
        args = ["models", "init", fixtures / f"{name}.onnx", "--name", name, "--repository", repo]
        if (fixtures / f"{name}.csv").exists():
            args += ["--sample", fixtures / f"{name}.csv"]
        results[name] = _run(*args)
    return repo, results


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _sample(fixtures: Path, name: str) -> np.ndarray:
    """The sample rows init was given (or, for the image model, seeded images)."""
    csv_path = fixtures / f"{name}.csv"
    if csv_path.exists():
        return np.loadtxt(csv_path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    return np.random.default_rng(7).standard_normal((3, 3, 16, 16)).astype(np.float32)


def _dense(o, value) -> np.ndarray:
    """onnxruntime's output as Nightingale serves it (ZipMap's list of maps made dense)."""
    if o.type.startswith("seq(map("):
        return np.array([list(d.values()) for d in value], dtype=np.float32)
    return np.asarray(value)


def _ort_outputs(sess, x: np.ndarray) -> dict[str, np.ndarray]:
    outs = sess.get_outputs()
    values = sess.run([o.name for o in outs], {sess.get_inputs()[0].name: x})
    return {o.name: _dense(o, v) for o, v in zip(outs, values)}


def test_init_runs_on_every_fixture(scaffolded):
    repo, results = scaffolded
    for name, proc in results.items():
        if name in REFUSED:
            assert proc.returncode == 1 and REFUSED[name] in proc.stderr, (name, proc.stderr)
            assert not (repo / name).exists()
        else:
            assert proc.returncode == 0, (name, proc.stdout, proc.stderr)
            assert (repo / name / "bundle.toml").is_file()
    assert not [p.name for p in repo.iterdir() if p.name.startswith(".")], "staging folders left behind"


@pytest.mark.parametrize("name", MODELS)
def test_inputs_and_outputs_are_what_onnxruntime_runs(fixtures, scaffolded, name):
    repo, results = scaffolded
    assert results[name].returncode == 0, results[name].stderr
    manifest = tomllib.loads((repo / name / "bundle.toml").read_text())
    sess = _session(fixtures / f"{name}.onnx")

    ins = sess.get_inputs()
    assert [(i["name"], i["datatype"]) for i in manifest["inputs"]] == [(i.name, _ORT_TYPES[i.type]) for i in ins]
    assert [i["shape"] for i in manifest["inputs"]] == [
        [d if isinstance(d, int) else -1 for d in i.shape] for i in ins
    ]

    outs = sess.get_outputs()
    assert [o["name"] for o in manifest["outputs"]] == [o.name for o in outs]
    assert [o["datatype"] for o in manifest["outputs"]] == [
        "FP32" if o.type.startswith("seq(map(") else _ORT_TYPES[o.type] for o in outs
    ]
    # Real output shapes at two batch sizes (one where the batch is fixed).
    x = _sample(fixtures, name)
    fixed_batch = isinstance(ins[0].shape[0], int)
    batches = [x[:1]] if fixed_batch else [x[:1], x[:3]]
    runs = [_ort_outputs(sess, b) for b in batches]
    for o in manifest["outputs"]:
        shapes = [r[o["name"]].shape for r in runs]
        expected = [shapes[0][d] if all(s[d] == shapes[0][d] for s in shapes) else -1
                    for d in range(len(shapes[0]))]
        assert o["shape"] == expected, (o["name"], shapes)


@pytest.mark.parametrize("name", MODELS)
def test_disagreements_with_the_file_are_reported(scaffolded, name):
    _, results = scaffolded
    warnings = [ln for ln in results[name].stderr.splitlines() if ln.startswith("warning:")]
    if name in DISAGREE:
        tensor, declared, runs = DISAGREE[name]
        assert len(warnings) == 1, warnings
        assert f'output "{tensor}"' in warnings[0] and declared in warnings[0] and runs in warnings[0], warnings
    else:
        assert warnings == []


@pytest.mark.parametrize("name", MODELS)
def test_models_check_passes_and_lists_the_todo_fields(scaffolded, name):
    repo, _ = scaffolded
    proc = _run("models", "check", repo / name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"ok   {name}: unsigned", lines  # init does not sign: `models sign` after filling in
    assert lines[1].startswith(f"ok   {name} version 1: checksums verified"), lines
    assert [ln.split(": ")[1].split(" ")[0] for ln in lines[2:]] == TODO_FIELDS, lines
    assert all(ln.startswith(f"warn {name}: ") for ln in lines[2:])


@pytest.mark.parametrize("name", [m for m in MODELS if m != "torch_cnn"])
def test_selftest_agrees_with_onnxruntime(fixtures, scaffolded, name):
    repo, _ = scaffolded
    manifest = tomllib.loads((repo / name / "bundle.toml").read_text())
    doc = json.loads((repo / name / "1" / "selftest.json").read_text())
    assert "NOT an independent reference" in doc["producer"] and doc["producer"].startswith(BACKEND)
    (inp,) = doc["inputs"]
    x = np.array(inp["data"], dtype=np.float32).reshape(inp["shape"])
    np.testing.assert_array_equal(x, _sample(fixtures, name))
    expected = _ort_outputs(_session(fixtures / f"{name}.onnx"), x)
    st = manifest["selftest"]
    for out in doc["outputs"]:
        got = np.array(out["data"]).reshape(out["shape"])
        want = expected[out["name"]]
        tol = st.get("outputs", {}).get(out["name"], {"atol": st["atol"], "rtol": st["rtol"]})
        assert got.shape == want.shape, out["name"]
        if out["datatype"].startswith(("INT", "UINT")):
            assert tol == {"atol": 0.0, "rtol": 0.0}
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.parametrize("name", [m for m in MODELS if m != "torch_cnn"])
def test_selftest_regenerated_by_onnxruntime_still_checks(scaffolded, tmp_path, name):
    repo, _ = scaffolded
    bundle = tmp_path / name
    shutil.copytree(repo / name, bundle)
    proc = subprocess.run([sys.executable, str(SELFTEST_PY), str(bundle), "1", "--reuse-inputs", "--update-manifest"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((bundle / "1" / "selftest.json").read_text())
    assert doc["producer"].startswith("onnxruntime "), doc["producer"]
    check = _run("models", "check", bundle)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.splitlines()[1].startswith(f"ok   {name} version 1: checksums verified, self-test"), check.stdout


def test_filled_in_and_signed_bundle_checks_clean_under_required_signatures(fixtures, tmp_path):
    """The workflow the docs give: init, fill in the TODO fields, sign, check strictly."""
    repo = tmp_path / "repo"
    init = _run("models", "init", fixtures / "skl_logreg.onnx", "--name", "m", "--repository", repo,
                "--sample", fixtures / "skl_logreg.csv", "--task", "tabular-risk")
    assert init.returncode == 0, init.stderr
    # The sample rows ship with the bundle as they are: said, with where (a review's finding:
    # the docs said self-test inputs hold no patient data).
    assert f"note: the sample rows are stored as they are in {repo / 'm'}/1/selftest.json" in init.stderr, \
        init.stderr
    manifest = repo / "m" / "bundle.toml"
    text = manifest.read_text()
    assert sum('"TODO: ' in ln for ln in text.splitlines() if not ln.startswith("#")) == len(TODO_FIELDS)
    manifest.write_text(text.replace('"TODO: ', '"Filled in: '))
    demo = REPO / "keys" / "demo"
    strict = ["--trusted-key", demo / "nightingale-demo.pub", "--require-signatures"]
    unsigned = _run("models", "check", repo / "m", *strict)
    assert unsigned.returncode == 1, unsigned.stdout
    sign = _run("models", "sign", "--key", demo / "nightingale-demo.key", repo / "m")
    assert sign.returncode == 0, sign.stdout + sign.stderr
    check = _run("models", "check", repo / "m", *strict)
    assert check.returncode == 0, check.stdout + check.stderr
    lines = check.stdout.splitlines()
    assert len(lines) == 2 and not any(ln.startswith("warn") for ln in lines), lines


def test_a_version_added_to_a_bundle_checks_and_serves_its_own_outputs(fixtures, tmp_path):
    """`models init --version N` adds a version to an existing bundle (a review's finding: the
    docs gave no way to make version N's entry, checksums and self-test): the model as N with
    its checksums, version 1's self-test inputs run through the new model (reference outputs
    checked here against onnxruntime on the new file), `[versions.N]` appended to bundle.toml
    as it is, its release raised; nothing changes where the new model does not fit the bundle."""
    repo = tmp_path / "repo"
    first = _run("models", "init", fixtures / "skl_logreg.onnx", "--name", "m", "--repository", repo,
                 "--sample", fixtures / "skl_logreg.csv")
    assert first.returncode == 0, first.stderr
    manifest = repo / "m" / "bundle.toml"
    # The scaffold declares release 1: its bundles are under replay protection (they were
    # not, a review's finding).
    assert tomllib.loads(manifest.read_text())["release"] == 1
    manifest.write_text("# kept as written\n" + manifest.read_text())
    added = _run("models", "init", fixtures / "skl_gradient_boosting.onnx", "--name", "m",
                 "--repository", repo, "--version", "2")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "added version 2" in added.stdout and "release raised from 1 to 2" in added.stdout, added.stdout
    text = manifest.read_text()
    assert text.startswith("# kept as written\n") and "\nrelease = 2\n" in text, text[:400]
    m = tomllib.loads(text)
    assert sorted(m["versions"]) == ["1", "2"] and m["release"] == 2
    st1 = json.loads((repo / "m" / "1" / "selftest.json").read_text())
    st2 = json.loads((repo / "m" / "2" / "selftest.json").read_text())
    assert st2["inputs"] == st1["inputs"]
    x = np.array(st2["inputs"][0]["data"], dtype=np.float32).reshape(st2["inputs"][0]["shape"])
    expected = _ort_outputs(_session(fixtures / "skl_gradient_boosting.onnx"), x)
    assert sorted(o["name"] for o in st2["outputs"]) == sorted(expected)
    for o in st2["outputs"]:
        got = np.array(o["data"]).reshape(o["shape"])
        np.testing.assert_allclose(got, expected[o["name"]], atol=1e-5, rtol=1e-4, err_msg=o["name"])
    check = _run("models", "check", repo / "m")
    assert check.returncode == 0, check.stdout + check.stderr
    # (The hidden lock file stays: removing it would race with the next holder.)
    assert sorted(p.name for p in repo.iterdir()) == [".m.init.lock", "m"], "a staging folder was left behind"
    # Refused, nothing changed: the version again, a model that does not fit the bundle's
    # inputs, a bundle that is not there.
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    again = _run("models", "init", fixtures / "skl_logreg.onnx", "--name", "m", "--repository", repo,
                 "--version", "2")
    assert again.returncode == 1 and "version 2 of m already exists" in again.stderr, again.stderr
    misfit = _run("models", "init", fixtures / "torch_cnn.onnx", "--name", "m", "--repository", repo,
                  "--version", "3")
    assert misfit.returncode == 1 and "do not fit the new model" in misfit.stderr, misfit.stderr
    missing = _run("models", "init", fixtures / "skl_logreg.onnx", "--name", "other", "--repository", repo,
                   "--version", "2")
    assert missing.returncode == 1 and "holds no bundle to add a version to" in missing.stderr, missing.stderr
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in repo.iterdir()) == [".m.init.lock", "m"]
    # Two at once: each either adds its version (listed, and the bundle checks) or is refused
    # because the other holds the bundle (both said "added", and one was left unlisted, which
    # refused the whole bundle: a review's finding).
    procs = {v: subprocess.Popen([str(_binary()), "models", "init", str(fixtures / "skl_imputer_pipeline.onnx"),
                                  "--name", "m", "--repository", str(repo), "--version", v],
                                 cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v in ("3", "4")}
    outcomes = {v: (p.wait(timeout=120), p.stderr.read()) for v, p in procs.items()}
    listed = tomllib.loads(manifest.read_text())["versions"]
    for v, (code, err) in outcomes.items():
        if code == 0:
            assert v in listed, (v, listed)
        else:
            assert "another `models init --version` is adding a version to m" in err, err
            assert not (repo / "m" / v).exists()
    assert any(code == 0 for code, _ in outcomes.values())
    check = _run("models", "check", repo / "m")
    assert check.returncode == 0, check.stdout + check.stderr
    # A `release = N` line inside a multi-line string is not the key: the key is raised.
    text = manifest.read_text()
    release = tomllib.loads(text)["release"]
    lines = text.splitlines(keepends=True)
    first = next(i for i, ln in enumerate(lines) if ln.startswith("description = "))
    manifest.write_text(f'description = """\nrelease = {release}\n"""\n' + "".join(lines[:first] + lines[first + 1:]))
    added = _run("models", "init", fixtures / "skl_logreg.onnx", "--name", "m", "--repository", repo,
                 "--version", "9")
    assert added.returncode == 0, added.stderr
    after = tomllib.loads(manifest.read_text())
    assert after["release"] == release + 1, added.stdout
    assert after["description"] == f"release = {release}\n", after["description"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, addr: str, err_path: Path) -> None:
    """Until the server at `addr` is ready (bounded); fails with its log if it exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert proc.poll() is None, err_path.read_text(errors="replace")[-5000:]
        assert time.monotonic() < deadline, "server not ready"
        try:
            if requests.get(f"http://{addr}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(scaffolded, tmp_path_factory):
    """A server on the scaffolded repository."""
    repo, _ = scaffolded
    logdir = tmp_path_factory.mktemp("init-server")
    addr = f"127.0.0.1:{_free_port()}"
    err_path = logdir / "stderr.log"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([str(_binary()), "serve", "--repository", str(repo), "--http-addr", addr,
                                 "--audit-log", str(logdir / "audit.jsonl")],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=_env())
    try:
        _wait_ready(proc, addr, err_path)
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.parametrize("name", MODELS)
def test_scaffolded_bundle_serves_like_onnxruntime(fixtures, scaffolded, server, name):
    repo, _ = scaffolded
    manifest = tomllib.loads((repo / name / "bundle.toml").read_text())
    x = _sample(fixtures, name)
    if manifest["inputs"][0]["shape"][0] == 1:
        x = x[:1]
    inp = manifest["inputs"][0]
    body = {"inputs": [{"name": inp["name"], "datatype": "FP32", "shape": list(x.shape),
                        "data": x.reshape(-1).tolist()}]}
    r = requests.post(f"http://{server}/v2/models/{name}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    got = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
    expected = _ort_outputs(_session(fixtures / f"{name}.onnx"), x)
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        if want.dtype.kind in "iu":
            np.testing.assert_array_equal(got[key], want, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], want, atol=1e-5, rtol=1e-4, err_msg=key)


# --- hostile input: refused with a clear message, nothing left in the repository ---------

def _refused(repo: Path, proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "panicked" not in proc.stderr
    leftovers = list(repo.iterdir()) if repo.exists() else []
    assert [p.name for p in leftovers if p.name != "existing"] == [], leftovers


def test_refuses_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a text file, not a model\n" * 10)
    repo = tmp_path / "repo"
    _refused(repo, _run("models", "init", bad, "--name", "m", "--repository", repo), "is not a valid ONNX model")


def test_refuses_a_truncated_model(fixtures, tmp_path):
    data = (fixtures / "skl_random_forest.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    repo = tmp_path / "repo"
    _refused(repo, _run("models", "init", cut, "--name", "m", "--repository", repo), "is not a valid ONNX model")


def test_refuses_a_file_over_the_protobuf_limit(tmp_path):
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as f:  # sparse: no disk used
        f.truncate(3 << 30)
    repo = tmp_path / "repo"
    _refused(repo, _run("models", "init", huge, "--name", "m", "--repository", repo), "ONNX files hold at most 2147483648")


def test_refuses_a_model_the_engine_cannot_load(tmp_path):
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    path.write_bytes(m.SerializeToString())
    repo = tmp_path / "repo"
    _refused(repo, _run("models", "init", path, "--name", "m", "--repository", repo), f"the {BACKEND} engine cannot load")


def test_refuses_a_missing_model_file(tmp_path):
    repo = tmp_path / "repo"
    _refused(repo, _run("models", "init", tmp_path / "absent.onnx", "--name", "m", "--repository", repo), "cannot read")


@pytest.mark.parametrize("bad", ["../escape", ".hidden", "a b", "x" * 129, "a/b"])
def test_refuses_invalid_names(fixtures, tmp_path, bad):
    repo = tmp_path / "repo"
    proc = _run("models", "init", fixtures / "torch_mlp.onnx", "--name", bad, "--repository", repo)
    _refused(repo, proc, "is not valid")
    assert not (tmp_path / "escape").exists()


def test_never_overwrites_an_existing_bundle(fixtures, tmp_path):
    repo = tmp_path / "repo"
    first = _run("models", "init", fixtures / "torch_mlp.onnx", "--name", "existing", "--repository", repo)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in (repo / "existing").rglob("*") if p.is_file()}
    again = _run("models", "init", fixtures / "skl_logreg.onnx", "--name", "existing", "--repository", repo)
    _refused(repo, again, "already exists")
    assert {p: p.read_bytes() for p in (repo / "existing").rglob("*") if p.is_file()} == before


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rows.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("x0,x1,x2,x3,x4,x5,x6,x7\n1,2,3,4,5,6,7,8\n1,2,3,4,5,6,7\n", "line 3 has 7 columns, the header 8"),
    ("x0,x1,x2,x3,x4,x5,x6,x7\n1,2,3,4,5,6,7,8\n1,2,3,oops,5,6,7,8\n", 'line 3, column "x3": not a number'),
    ("x0,x1,x2,x3,x4,x5,x6,x7\n1,2,3,4,5,,7,8\n", 'line 2, column "x5": empty cell'),
    ("x0,x1,x2,x3,x4,x5,x6,x7\n1,2,3,4,5,nan,7,8\n", 'line 2, column "x5": not a finite number'),
    ("1,2,3,4,5,6,7,8\n1,2,3,4,5,6,7,8\n", "the first line must name the columns"),
    ("x0,x1,x2,x3,x4,x5,x6,x7\n", "no rows after the header"),
    ("a,b,c\n1,2,3\n", "3 columns, but input \"input.1\" takes 8 features"),
])
def test_refuses_bad_sample_csvs(fixtures, tmp_path, text, needle):
    repo = tmp_path / "repo"
    proc = _run("models", "init", fixtures / "torch_mlp.onnx", "--name", "m", "--repository", repo,
                "--sample", _csv(tmp_path, text))
    _refused(repo, proc, needle)
    assert "oops" not in proc.stderr or "oops" in needle  # cell values are not echoed


def test_refuses_a_sample_for_an_image_model(fixtures, tmp_path):
    repo = tmp_path / "repo"
    proc = _run("models", "init", fixtures / "torch_cnn.onnx", "--name", "m", "--repository", repo,
                "--sample", fixtures / "torch_mlp.csv")
    _refused(repo, proc, "--sample feeds tabular models")


def test_refuses_more_rows_than_a_fixed_batch_takes(fixtures, tmp_path):
    repo = tmp_path / "repo"
    proc = _run("models", "init", fixtures / "torch_mlp_fixed_batch.onnx", "--name", "m", "--repository", repo,
                "--sample", fixtures / "torch_mlp.csv")
    _refused(repo, proc, 'input "input.1" takes exactly 1 per run')


def test_text_from_the_file_cannot_become_a_setting(tmp_path):
    """Red-team finding: a dimension name, the producer or the file name was written into a
    `# declared in the file: ...` comment as it was, so a newline in it ended the comment and
    the rest became a setting (`allow_non_finite = true`, accepted by `models check`, and the
    served bundle then let NaN through). Control characters in such text are shown as `?`."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N\nallow_non_finite = true\n#", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N\nallow_non_finite = true\n#", 4])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)],
                          producer_name="evil\r\n[intended_use]\nsummary = \"x\"")
    path = tmp_path / "inject.onnx"
    path.write_bytes(m.SerializeToString())
    repo = tmp_path / "repo"
    proc = _run("models", "init", path, "--name", "inject", "--repository", repo)
    assert proc.returncode == 0, proc.stderr
    text = (repo / "inject" / "bundle.toml").read_text()
    manifest = tomllib.loads(text)
    assert "allow_non_finite" not in json.dumps(manifest), text
    assert "N?allow_non_finite = true?#" in text, text
    assert "evil??[intended_use]?summary" in text, text
    check = _run("models", "check", repo / "inject")
    assert check.returncode == 0, check.stderr


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_an_answer_larger_than_the_budget_is_refused_before_the_model_makes_it(tmp_path):
    """Review findings: a model's outputs and their encoding were charged to
    `--max-inflight-bytes` only once the answer was made (a 659-byte request's 369 MB JSON
    answer was built, the server at 2.8x its budget; then a 1.3 KB request had its 1 GiB
    output made before the 413). The outputs a model's declared shapes give are charged
    before it runs; an answer that fits is served as onnxruntime computes it."""
    import onnx

    # x FP32 [N, 4] -> Tile -> y FP32 [N, 4 Mi]: 16 MiB a row, declared.
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "reps"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4 << 20])],
        [helper.make_tensor("reps", TensorProto.INT64, [2], [1, 1 << 20])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    repo = tmp_path / "repo"
    init = _run("models", "init", path, "--name", "big", "--repository", repo)
    assert init.returncode == 0, init.stderr
    addr = f"127.0.0.1:{_free_port()}"
    err_path = tmp_path / "stderr.log"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([str(_binary()), "serve", "--repository", str(repo), "--http-addr", addr,
                                 "--data-dir", str(tmp_path / "data"),
                                 "--max-inflight-bytes", str(64 << 20), "--max-body-bytes", str(1 << 20)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=_env())
    try:
        _wait_ready(proc, addr, err_path)
        url = f"http://{addr}/v2/models/big/infer"

        def ask(rows: int) -> requests.Response:
            x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4],
                                "data": x.ravel().tolist()}],
                    "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
            return requests.post(url, json=body, timeout=120)

        before = _peak_rss_mib(proc.pid)
        # 8 rows: 128 MiB of outputs declared, over the 64 MiB budget: refused before the
        # model runs, naming the answer, and the server's memory does not grow by it.
        r = ask(8)
        assert r.status_code == 413, r.text
        assert "the answer needs" in r.json()["error"], r.text
        grew = _peak_rss_mib(proc.pid) - before
        print(f"peak RSS grew {grew:.0f} MiB for a refused 128 MiB answer")
        assert grew < 64, grew
        # 1 row (16 MiB, binary): served, equal to onnxruntime's answer.
        r = ask(1)
        assert r.status_code == 200, r.text
        header = int(r.headers["Inference-Header-Content-Length"])
        y = np.frombuffer(r.content[header:], dtype=np.float32)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        [expected] = session.run(None, {"x": np.arange(4, dtype=np.float32).reshape(1, 4)})
        assert np.array_equal(y, expected.ravel())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
