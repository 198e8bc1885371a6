#!/usr/bin/env python3
"""Benchmark-only bundle `models/bench/resnet50-arch`: the ResNet-50 architecture with
synthetic constant weights, for load tests whose compute dominates the HTTP overhead.

NOT a clinical model and not a trained one: its outputs mean nothing. It lives in a
separate repository folder (`models/bench/`), never in `models/bundles/`.

Source: `onnx/backend/test/data/light/light_resnet50.onnx` from the installed `onnx`
wheel (pinned in requirements.txt; Apache-2.0). That file is the real ResNet-50 graph
(caffe2 export, opset 9, 53 Conv, 53 BatchNormalization, input FP32 [1,3,224,224],
output softmax [1,1000]) whose weights are generated at load time by `ConstantOfShape`
nodes (value 0.02), so it is 80 KB. This script changes only what serving needs:

  * input `gpu_0/data_0` -> `image`, output `gpu_0/softmax_1` -> `probabilities`
    (it is a Softmax output), batch dimension 0 of both -> dim_param `N`;
  * the Reshape before the final Gemm: shape constant [1, 2048] -> [-1, 2048]
    (`OC2_DUMMY_1` renamed `flatten_shape`), so any batch size flattens;
  * the 269 weight/shape tensors listed as graph inputs (IR version 3 requires
    initializers to be inputs) are removed from the inputs and `ir_version` is set
    to 4, so the model has exactly one input; one unused initializer
    (`gpu_0/imagenet1k_blobs_queue_..._0`, [1,1], not read by any node) is dropped;
  * doc_string says what the file is.

The ConstantOfShape weights are kept (nothing is materialised), so model.onnx stays ~80 KB.
The result is checked with onnxruntime: batch 1 and batch 4 of random input give the same
per-row outputs as the original model run row by row (also before the Softmax).

  .venv/bin/python models/train/resnet50_bench.py
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "models" / "bench" / "resnet50-arch"
SCRIPT = "models/train/resnet50_bench.py"

ONNX_VERSION = "1.23.2"
SOURCE_REL = "onnx/backend/test/data/light/light_resnet50.onnx"
SOURCE_SHA256 = "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4"
OLD_INPUT, NEW_INPUT = "gpu_0/data_0", "image"
OLD_OUTPUT, NEW_OUTPUT = "gpu_0/softmax_1", "probabilities"
OLD_SHAPE, NEW_SHAPE = "OC2_DUMMY_1", "flatten_shape"
PRE_SOFTMAX = "r174"  # the Gemm output, compared too (the softmax of constant weights is flat)
CREATED = "2026-11-25"
SEED = 20261125
ATOL = 1e-5
RTOL = 1e-5

DESCRIPTION = (
    "ResNet-50 architecture-only benchmark model with synthetic constant weights; "
    "not a clinical model; its outputs mean nothing."
)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def source_path() -> Path:
    if onnx.__version__ != ONNX_VERSION:
        sys.exit(f"error: onnx {onnx.__version__} installed, this script expects {ONNX_VERSION} (requirements.txt)")
    p = Path(onnx.__file__).resolve().parent.parent / SOURCE_REL
    got = sha256_bytes(p.read_bytes())
    if got != SOURCE_SHA256:
        sys.exit(f"error: {p} has sha256 {got}, expected {SOURCE_SHA256}")
    return p


def convert(orig: onnx.ModelProto) -> onnx.ModelProto:
    m = copy.deepcopy(orig)
    g = m.graph
    used = {i for n in g.node for i in n.input}
    inits = {t.name for t in g.initializer}

    # One unused initializer; only the image stays a graph input.
    kept = [t for t in g.initializer if t.name in used]
    assert len(g.initializer) - len(kept) == 1, [t.name for t in g.initializer if t.name not in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    image = [i for i in g.input if i.name not in inits]
    assert [i.name for i in image] == [OLD_INPUT], [i.name for i in image]
    del g.input[:]
    g.input.extend(image)
    m.ir_version = 4  # IR >= 4: initializers need not be listed as inputs

    # Reshape [N,2048,1,1] -> [N,2048] for any N.
    (shape,) = [t for t in g.initializer if t.name == OLD_SHAPE]
    assert numpy_helper.to_array(shape).tolist() == [1, 2048]
    shape.CopyFrom(numpy_helper.from_array(np.array([-1, 2048], dtype=np.int64), NEW_SHAPE))
    reshapes = [n for n in g.node if OLD_SHAPE in n.input]
    assert len(reshapes) == 1 and reshapes[0].op_type == "Reshape"
    reshapes[0].input[1] = NEW_SHAPE

    # Names and the dynamic batch dimension.
    for n in g.node:
        n.input[:] = [NEW_INPUT if x == OLD_INPUT else x for x in n.input]
        n.output[:] = [NEW_OUTPUT if x == OLD_OUTPUT else x for x in n.output]
    assert g.output[0].name == OLD_OUTPUT and len(g.output) == 1
    g.input[0].name = NEW_INPUT
    g.output[0].name = NEW_OUTPUT
    for vi in (g.input[0], g.output[0]):
        d0 = vi.type.tensor_type.shape.dim[0]
        assert d0.dim_value == 1
        d0.Clear()
        d0.dim_param = "N"

    m.doc_string = (
        f"Nightingale benchmark model (made by {SCRIPT}) from {SOURCE_REL} of the onnx {ONNX_VERSION} "
        "wheel (Apache-2.0): ResNet-50 architecture, synthetic constant weights (ConstantOfShape 0.02 "
        "and the source's fixed BatchNormalization parameters), dynamic batch. Architecture-only "
        "benchmark model; not a clinical model; its outputs mean nothing."
    )
    onnx.checker.check_model(m, full_check=True)
    return m


def with_pre_softmax(m: onnx.ModelProto) -> bytes:
    """The model with the Gemm output exposed too, for the equivalence check only."""
    m = copy.deepcopy(m)
    m.graph.output.append(helper.make_tensor_value_info(PRE_SOFTMAX, onnx.TensorProto.FLOAT, None))
    return m.SerializeToString()


def session(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def check(orig: onnx.ModelProto, new: onnx.ModelProto) -> dict:
    s_old = session(with_pre_softmax(orig))
    s_new = session(with_pre_softmax(new))
    assert [(i.name, i.shape) for i in s_new.get_inputs()] == [(NEW_INPUT, ["N", 3, 224, 224])], s_new.get_inputs()
    assert [o.name for o in s_new.get_outputs()][0] == NEW_OUTPUT
    x = np.random.default_rng(SEED).standard_normal((4, 3, 224, 224)).astype(np.float32)
    want = [s_old.run([OLD_OUTPUT, PRE_SOFTMAX], {OLD_INPUT: x[i : i + 1]}) for i in range(4)]
    want_p = np.concatenate([w[0] for w in want])
    want_g = np.concatenate([w[1] for w in want])
    report = {}
    for batch in (1, 4):
        p, g = s_new.run([NEW_OUTPUT, PRE_SOFTMAX], {NEW_INPUT: x[:batch]})
        assert p.shape == (batch, 1000) and g.shape == (batch, 1000), (p.shape, g.shape)
        assert np.isfinite(p).all() and np.isfinite(g).all()
        np.testing.assert_allclose(p, want_p[:batch], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(g, want_g[:batch], rtol=RTOL, atol=ATOL)
        report[batch] = {
            "max_abs_diff_probabilities": float(np.abs(p - want_p[:batch]).max()),
            "max_abs_diff_pre_softmax": float(np.abs(g - want_g[:batch]).max()),
            "pre_softmax_range": [float(g.min()), float(g.max())],
        }
    return report


def bundle_toml(model_sha: str) -> str:
    j = json.dumps
    lines = [
        f"# Generated by {SCRIPT} -- edit the script, not this file.",
        "format_version = 1",
        'name = "resnet50-arch"',
        'task = "image-classification"',
        f"description = {j(DESCRIPTION)}",
        'platform = "onnx"',
        'backend = "any"',
        "",
        "[version_policy]",
        'policy = "latest"',
        "latest = 1",
        "",
        "[batching]",
        "max_batch_size = 64",
        "max_queue_delay_us = 200",
        "preferred_batch_sizes = [8, 16, 32, 64]",
        "instances = 1",
        "queue_capacity = 16",
        "",
        "[[inputs]]",
        'name = "image"',
        'datatype = "FP32"',
        "shape = [-1, 3, 224, 224]",
        'description = "any FP32 tensor of this shape (NCHW); no preprocessing is implied, the weights are synthetic"',
        "",
        "[[outputs]]",
        'name = "probabilities"',
        'datatype = "FP32"',
        "shape = [-1, 1000]",
        'description = "softmax over 1000 meaningless classes (constant weights make it nearly flat); benchmark output only"',
        "",
        "[intended_use]",
        'summary = "Benchmark only: load and throughput tests of the serving path on a model whose compute dominates per-request overhead. Not a clinical model; its outputs mean nothing."',
        'users = "Nightingale developers running benches/load/run_resnet.sh"',
        "limitations = [",
        '  "Architecture-only: the weights are synthetic constants (ConstantOfShape 0.02) plus the source file\'s fixed BatchNormalization parameters; nothing was trained",',
        '  "Its outputs mean nothing and must never be shown to a clinician or used for any decision",',
        '  "Timings depend on the engine and the CPU; use ratios measured in the same run",',
        "]",
        "",
        "[provenance]",
        f'training_data = "none (not trained): graph from {SOURCE_REL} in the onnx {ONNX_VERSION} Python wheel (PyPI), sha256 {SOURCE_SHA256}"',
        'data_licence = "n/a (no data)"',
        'model_licence = "Apache-2.0 (onnx package test data)"',
        f"training_script = {j(SCRIPT)}",
        "",
        "[versions.1]",
        f"description = {j('light_resnet50.onnx with a dynamic batch dimension, input image, output probabilities, Reshape to [-1, 2048]; weights kept as ConstantOfShape')}",
        f"created = {j(CREATED)}",
        "",
        "[versions.1.files]",
        f'"model.onnx" = "{model_sha}"',
    ]
    return "\n".join(lines) + "\n"


def model_card(model_sha: str, n_bytes: int) -> str:
    return f"""<!-- Generated by {SCRIPT} -- edit the script, not this file. -->
# Model card: resnet50-arch (version 1) — benchmark only

> **Architecture-only benchmark model with synthetic constant weights; not a clinical model;
> its outputs mean nothing.** It exists so that load tests can measure the serving path on a
> model whose compute (ResNet-50, about 4 GFLOP per image) dominates the per-request HTTP cost.

- **Intended use:** benchmarks only (`benches/load/run_resnet.sh`). Never for any decision about
  a patient, never as an example of an imaging model.
- **Where it lives:** `models/bench/`, a repository of its own, so `serve` on the default
  `models/bundles` never loads it.
- **Source:** `{SOURCE_REL}` from the `onnx` {ONNX_VERSION} Python wheel (PyPI; licence
  Apache-2.0), sha256 `{SOURCE_SHA256}`: the ResNet-50 graph (caffe2 export, opset 9) whose
  weights are `ConstantOfShape` nodes filled with 0.02, plus fixed BatchNormalization parameters
  for the first blocks. Nothing was trained and there is no data.
- **Changes** (by `{SCRIPT}`): input renamed `image` and output `probabilities` (the graph ends in
  a Softmax), batch dimension made dynamic (`N`), the Reshape before the classifier changed from
  `[1, 2048]` to `[-1, 2048]`, the weight tensors removed from the graph inputs (IR version 3 → 4)
  and one unused initializer dropped. The weights stay `ConstantOfShape`, so `model.onnx` is
  {n_bytes:,} bytes (sha256 `{model_sha}`).
- **Check:** onnxruntime, random N(0,1) input (seed {SEED}), batch 1 and batch 4 against the original
  model run row by row, probabilities and the pre-softmax Gemm output; they agree within
  rtol {RTOL:g} + atol {ATOL:g} (the script prints the max abs differences).
- **Input:** `image` FP32 `[N, 3, 224, 224]`. **Output:** `probabilities` FP32 `[N, 1000]`, nearly
  flat because the classifier weights are constant. Batching: up to 64 rows, one instance.
"""


def main() -> int:
    src = source_path()
    orig = onnx.load(str(src))
    new = convert(orig)
    data = new.SerializeToString()
    report = check(orig, new)
    for b, r in report.items():
        print(f"batch {b}: max abs diff vs original (row by row): probabilities {r['max_abs_diff_probabilities']:.3e}, "
              f"pre-softmax {r['max_abs_diff_pre_softmax']:.3e}; pre-softmax range {r['pre_softmax_range']}")
    model_sha = sha256_bytes(data)
    vdir = BUNDLE / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "model.onnx").write_bytes(data)
    (BUNDLE / "bundle.toml").write_text(bundle_toml(model_sha), encoding="utf-8")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from signing import sign_bundle

    sign_bundle(BUNDLE)
    (BUNDLE / "MODEL_CARD.md").write_text(model_card(model_sha, len(data)), encoding="utf-8")
    import tomllib

    parsed = tomllib.loads((BUNDLE / "bundle.toml").read_text(encoding="utf-8"))
    assert parsed["versions"]["1"]["files"]["model.onnx"] == model_sha
    print(f"{vdir / 'model.onnx'}: {len(data)} bytes, sha256 {model_sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
