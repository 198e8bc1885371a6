#!/usr/bin/env python3
"""Models of the kinds users bring, for the `nightingale models init` tests
(tests/peer/test_models_init.py): scikit-learn estimators exported by skl2onnx, and
"PyTorch-style" graphs built with `onnx.helper` the way `torch.onnx.export` writes them.

    .venv/bin/python models/train/make_init_fixtures.py OUT_DIR

writes, for each fixture NAME, `OUT_DIR/NAME.onnx` and (for tabular models) `OUT_DIR/NAME.csv`
(a header naming the features, then sample rows), plus `OUT_DIR/fixtures.json` listing them.
Everything is seeded; the peer test generates them into a temporary folder (about 5 s).

torch itself is NOT used: the PyPI build is ~5 GB (TESTBED.md) and nothing else here needs it.
Instead the graphs copy what its exporter writes: inputs named `input.1` / `onnx::Gemm_0`,
parameters named `fc1.weight`, intermediate values `/fc1/Gemm_output_0`, a dynamic axis
`batch_size` (or a fixed batch of 1, the exporter's default without `dynamic_axes`), Gemm with
transB=1, Conv + BatchNormalization + GlobalAveragePool + Flatten, opset 17 — and the two
mistakes seen in real exports: an output declared with the wrong shape, and one declared with
no shape at all.

Scikit-learn models are fitted on data sets that ship with scikit-learn (breast cancer, wine,
diabetes); the sample rows are rows of those data sets, not patient records of ours.
"""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 20261201
OPSET = {"": 17, "ai.onnx.ml": 3}
SAMPLE_ROWS = 12


def _write_csv(path: Path, header: list[str], rows: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([repr(float(v)) for v in r])


def sklearn_fixtures(out: Path) -> list[dict]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier, RandomForestRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    bc, wine, diab = load_breast_cancer(), load_wine(), load_diabetes()
    cases = [
        # name, estimator, data set, zipmap
        ("skl_logreg", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), bc, False),
        ("skl_logreg_zipmap", make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), bc, True),
        ("skl_random_forest", RandomForestClassifier(n_estimators=15, max_depth=5, random_state=SEED % 2**31), wine, False),
        ("skl_gradient_boosting", GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=SEED % 2**31), bc, False),
        ("skl_mlp", make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), max_iter=800, random_state=SEED % 2**31)), wine, False),
        ("skl_svc", make_pipeline(StandardScaler(), SVC(probability=True, random_state=SEED % 2**31)), wine, False),
        ("skl_imputer_pipeline", make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=2000)), bc, False),
        ("skl_linear_regression", LinearRegression(), diab, None),
        ("skl_rf_regressor", RandomForestRegressor(n_estimators=10, max_depth=4, random_state=SEED % 2**31), diab, None),
    ]
    fixtures = []
    rng = np.random.default_rng(SEED)
    for name, est, data, zipmap in cases:
        x = data.data.astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(x, data.target)
        options = None if zipmap is None else {id(est): {"zipmap": zipmap}}
        onx = convert_sklearn(
            est,
            initial_types=[("input", FloatTensorType([None, x.shape[1]]))],
            target_opset=OPSET,
            options=options,
        )
        (out / f"{name}.onnx").write_bytes(onx.SerializeToString())
        rows = x[rng.choice(len(x), SAMPLE_ROWS, replace=False)]
        header = [str(f) for f in data.feature_names]
        _write_csv(out / f"{name}.csv", header, rows)
        fixtures.append({"name": name, "kind": "sklearn", "sample": f"{name}.csv", "zipmap": bool(zipmap)})
    return fixtures


def _init(name: str, a: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(a.astype(np.float32), name)


def _model(graph: onnx.GraphProto, check: bool = True) -> bytes:
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        producer_name="pytorch",
        producer_version="2.5.1",
    )
    m.ir_version = 8
    if check:  # the checker insists on a shape for every graph output; onnxruntime does not
        onnx.checker.check_model(m)
    return m.SerializeToString()


def torch_mlp(rng, *, input_name="input.1", batch="batch_size", out_dims=None, n_in=8, n_hidden=16, n_out=3, softmax=True) -> bytes:
    """Gemm/Relu/Gemm(/Softmax) as torch.onnx.export writes an nn.Sequential MLP.
    `out_dims` overrides the declared output shape (`"none"`: declared without a shape)."""
    w1 = rng.standard_normal((n_hidden, n_in)) * 0.5
    b1 = rng.standard_normal(n_hidden) * 0.1
    w2 = rng.standard_normal((n_out, n_hidden)) * 0.5
    b2 = rng.standard_normal(n_out) * 0.1
    nodes = [
        helper.make_node("Gemm", [input_name, "fc1.weight", "fc1.bias"], ["/fc1/Gemm_output_0"], name="/fc1/Gemm", alpha=1.0, beta=1.0, transB=1),
        helper.make_node("Relu", ["/fc1/Gemm_output_0"], ["/act/Relu_output_0"], name="/act/Relu"),
        helper.make_node("Gemm", ["/act/Relu_output_0", "fc2.weight", "fc2.bias"], ["/fc2/Gemm_output_0" if softmax else "output"], name="/fc2/Gemm", alpha=1.0, beta=1.0, transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["/fc2/Gemm_output_0"], ["output"], name="/softmax/Softmax", axis=1))
    if out_dims == "none":
        out = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
    else:
        out = helper.make_tensor_value_info("output", TensorProto.FLOAT, out_dims or [batch, n_out])
    g = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, n_in])],
        [out],
        [_init("fc1.weight", w1), _init("fc1.bias", b1), _init("fc2.weight", w2), _init("fc2.bias", b2)],
    )
    return _model(g, check=out_dims != "none")


def torch_cnn(rng) -> bytes:
    """Conv/BatchNorm/Relu/GlobalAveragePool/Flatten/Gemm on [batch_size, 3, 16, 16] images."""
    c = 6
    nodes = [
        helper.make_node("Conv", ["input.1", "conv.weight", "conv.bias"], ["/conv/Conv_output_0"], name="/conv/Conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["/conv/Conv_output_0", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"], ["/bn/BatchNormalization_output_0"], name="/bn/BatchNormalization", epsilon=1e-5, momentum=0.9),
        helper.make_node("Relu", ["/bn/BatchNormalization_output_0"], ["/relu/Relu_output_0"], name="/relu/Relu"),
        helper.make_node("GlobalAveragePool", ["/relu/Relu_output_0"], ["/pool/GlobalAveragePool_output_0"], name="/pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["/pool/GlobalAveragePool_output_0"], ["/Flatten_output_0"], name="/Flatten", axis=1),
        helper.make_node("Gemm", ["/Flatten_output_0", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1),
    ]
    inits = [
        _init("conv.weight", rng.standard_normal((c, 3, 3, 3)) * 0.3),
        _init("conv.bias", rng.standard_normal(c) * 0.1),
        _init("bn.weight", 1 + 0.1 * rng.standard_normal(c)),
        _init("bn.bias", 0.1 * rng.standard_normal(c)),
        _init("bn.running_mean", 0.1 * rng.standard_normal(c)),
        _init("bn.running_var", 1 + 0.1 * rng.random(c)),
        _init("fc.weight", rng.standard_normal((4, c)) * 0.5),
        _init("fc.bias", rng.standard_normal(4) * 0.1),
    ]
    g = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch_size", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 4])],
        inits,
    )
    return _model(g)


def torch_fixtures(out: Path) -> list[dict]:
    rng = np.random.default_rng(SEED + 1)
    cases = [
        # name, bytes, sample rows (None: image input), what the fixture is about
        ("torch_mlp", torch_mlp(rng), SAMPLE_ROWS, "dynamic axis batch_size, Gemm/Relu/Softmax"),
        ("torch_mlp_gemm_input", torch_mlp(rng, input_name="onnx::Gemm_0", softmax=False), SAMPLE_ROWS, "input named onnx::Gemm_0, logits out"),
        ("torch_mlp_fixed_batch", torch_mlp(rng, batch=1), 1, "exported without dynamic_axes: a fixed batch of 1"),
        ("torch_mlp_wrong_output_shape", torch_mlp(rng, out_dims=["batch_size", 5]), SAMPLE_ROWS, "output declared [batch_size, 5], computes [N, 3]"),
        ("torch_mlp_no_output_shape", torch_mlp(rng, out_dims="none"), SAMPLE_ROWS, "output declared without a shape"),
        ("torch_cnn", torch_cnn(rng), None, "Conv/BatchNorm/GlobalAveragePool image model"),
    ]
    fixtures = []
    sample_rng = np.random.default_rng(SEED + 2)
    for name, model, rows, about in cases:
        (out / f"{name}.onnx").write_bytes(model)
        entry = {"name": name, "kind": "torch", "about": about, "sample": None, "zipmap": False}
        if rows is not None:
            n_in = 8
            _write_csv(out / f"{name}.csv", [f"x{i}" for i in range(n_in)], sample_rng.standard_normal((rows, n_in)).astype(np.float32))
            entry["sample"] = f"{name}.csv"
        fixtures.append(entry)
    return fixtures


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    fixtures = sklearn_fixtures(out) + torch_fixtures(out)
    (out / "fixtures.json").write_text(json.dumps(fixtures, indent=1) + "\n")
    print(f"{len(fixtures)} fixtures in {out}")


if __name__ == "__main__":
    main()
