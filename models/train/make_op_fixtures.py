#!/usr/bin/env python3
"""Write ONNX-ML conformance fixtures for the ops Nightingale registers in tract.

For each fixture <name> this writes, into inference/tests/data/onnx-ml/:

  <name>.onnx   a small model, input `X` FP32 [None, F]: a scikit-learn model exported by
                skl2onnx, or (names starting `te_`) a hand-built tree ensemble that reaches
                corners of ONNX Runtime's semantics skl2onnx exports do not
  <name>.json   {"model": "<name>.onnx",
                 "inputs":  {"X": {"shape": [n, F], "data": [flat floats, null for NaN]}},
                 "outputs": {"<output>": {"datatype": "FP32"|"INT64", "shape": [...], "data": [flat]}}}

Expected outputs are onnxruntime's, on 20 rows of the data (16 for the hand-built
ensembles: a grid over both features, NaN included). Floats are written as the
shortest decimal that round-trips the float32 value, so parsing them as f32 gives
the exact tensor onnxruntime saw.

Fixtures (see `build()`): the scaler, a binarizer, logistic regression (with and without ZipMap),
tree ensembles (gradient boosting and random forests, binary and multi-class with
SOFTMAX), k-nearest neighbours (classifier binary, multi-class, distance-weighted;
regressor), SVMs (SVC binary and multi-class with every kernel, with and without
probability=True; NuSVC; SVR, NuSVR, OneClassSVM), SimpleImputer pipelines (mean,
median, most_frequent, constant on NaN; a numeric missing value), the hand-built
tree ensembles `te_*` and liblinear-layout SVM classifiers `svm_liblinear_*`. For
logreg_zipmap the ZipMap output (a sequence of maps) is
stored as a dense FP32 [n, 2] array with columns ordered by class key.

Everything is seeded: running the script twice writes identical bytes.

Run with the repository venv:  .venv/bin/python models/train/make_op_fixtures.py
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_breast_cancer, load_diabetes

from common import dedupe_opsets
from onnx import TensorProto, helper
from sklearn.base import is_classifier
from sklearn.datasets import load_iris, load_wine
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Binarizer, StandardScaler
from sklearn.svm import SVC, SVR, NuSVC, NuSVR, OneClassSVM

SEED = 20261124
N_ROWS = 20
MAX_BYTES = 200 * 1024
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "inference" / "tests" / "data" / "onnx-ml"


def rows(n_total: int) -> np.ndarray:
    """20 fixed, evenly spread row indices (both classes appear in breast cancer)."""
    return np.linspace(0, n_total - 1, N_ROWS).round().astype(np.int64)


def f32_list(a: np.ndarray) -> list[float | None]:
    """Flat float32 values; NaN (JSON has none) is written as null."""
    return [None if np.isnan(v) else float(v) for v in np.asarray(a, dtype=np.float32).ravel()]


def logreg_pipeline() -> Pipeline:
    return Pipeline(
        [("scaler", StandardScaler()), ("logreg", LogisticRegression(max_iter=5000))]
    )


def with_missing(X: np.ndarray, missing: float) -> np.ndarray:
    """X with about one value in eight replaced by `missing`, in the fixture rows too."""
    X = X.copy()
    mask = np.random.default_rng(SEED).random(X.shape) < 0.125
    X[mask] = missing
    return X


def scaled(est) -> Pipeline:
    return make_pipeline(StandardScaler(), est)


# ---------------------------------------------------------------------------------------
# Hand-built tree ensembles (the `te_*` fixtures)
# ---------------------------------------------------------------------------------------
#
# Two trees over features 0 and 1: tree 0 is `x0 <= 0.5` (NaN goes false), tree 1 is
# `x1 >= 0` (NaN goes true); each has two leaves. `votes` gives one (id, weight) per leaf,
# leaves in order (tree 0 true, tree 0 false, tree 1 true, tree 1 false).

TE_GRID = np.array(
    [[a, b] for a in (0.2, 0.5, 0.9, np.nan) for b in (-1.0, 0.0, 1.0, np.nan)], dtype=np.float32
)


def _te_nodes(prefix: str, votes) -> dict:
    leaves = [(0, 1), (0, 2), (1, 1), (1, 2)]
    return {
        "nodes_treeids": [0, 0, 0, 1, 1, 1],
        "nodes_nodeids": [0, 1, 2, 0, 1, 2],
        "nodes_featureids": [0, 0, 0, 1, 0, 0],
        "nodes_modes": ["BRANCH_LEQ", "LEAF", "LEAF", "BRANCH_GTE", "LEAF", "LEAF"],
        "nodes_values": [0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
        "nodes_truenodeids": [1, 0, 0, 1, 0, 0],
        "nodes_falsenodeids": [2, 0, 0, 2, 0, 0],
        "nodes_missing_value_tracks_true": [0, 0, 0, 1, 0, 0],
        f"{prefix}_treeids": [t for t, _ in leaves],
        f"{prefix}_nodeids": [n for _, n in leaves],
        f"{prefix}_ids": [v[0] for v in votes],
        f"{prefix}_weights": [float(v[1]) for v in votes],
    }


def _te_model(name: str, node: onnx.NodeProto, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], name, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2])], outputs
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
        producer_name="make_op_fixtures.py",
    )


def te_classifier(name, votes, labels, base_values, post) -> onnx.ModelProto:
    attrs = _te_nodes("class", votes)
    attrs["classlabels_int64s"] = labels
    if base_values:
        attrs["base_values"] = base_values
    attrs["post_transform"] = post
    node = helper.make_node(
        "TreeEnsembleClassifier", ["X"], ["label", "probabilities"], domain="ai.onnx.ml", **attrs
    )
    return _te_model(
        name,
        node,
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, len(labels)]),
        ],
    )


def te_regressor(name, votes, n_targets, aggregate, base_values) -> onnx.ModelProto:
    attrs = _te_nodes("target", votes)
    attrs["n_targets"] = n_targets
    attrs["aggregate_function"] = aggregate
    attrs["base_values"] = base_values
    node = helper.make_node("TreeEnsembleRegressor", ["X"], ["variable"], domain="ai.onnx.ml", **attrs)
    return _te_model(
        name, node, [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, n_targets])]
    )


MIXED = [(0, 0.1), (0, -0.4), (0, 0.3), (0, -0.05)]
POSITIVE = [(0, 0.1), (0, 0.4), (0, 0.3), (0, 0.05)]


def hand_built() -> list[tuple[str, onnx.ModelProto, np.ndarray]]:
    """Tree-ensemble corners: single-score binary layouts (mixed and non-negative weights,
    with and without LOGISTIC), votes for class 1 with two base values, multi-class base
    values with SOFTMAX and SOFTMAX_ZERO, NaN routing, several regression targets (a target
    without votes), every aggregate."""
    one_target = [(0, 0.25), (0, -1.5), (0, 3.0), (0, 0.75)]
    models = [
        te_classifier("te_binary_mixed_logistic", MIXED, [0, 1], [0.2], "LOGISTIC"),
        te_classifier("te_binary_mixed_none", MIXED, [0, 1], [], "NONE"),
        te_classifier("te_binary_positive_none", POSITIVE, [0, 1], [], "NONE"),
        te_classifier("te_binary_positive_logistic", POSITIVE, [0, 1], [0.2], "LOGISTIC"),
        te_classifier(
            "te_binary_class1_two_base", [(1, 0.1), (1, -0.4), (1, 0.3), (1, -0.05)], [0, 1], [0.2, 0.3], "NONE"
        ),
        te_classifier(
            "te_multiclass_softmax", [(0, 0.1), (1, -0.4), (2, 0.3), (0, -0.05)], [5, 6, 7], [0.0, 0.5, -0.5], "SOFTMAX"
        ),
        te_classifier(
            "te_multiclass_softmax_zero", [(0, 0.1), (1, -0.4), (2, 0.3), (0, -0.05)], [5, 6, 7], [], "SOFTMAX_ZERO"
        ),
        te_regressor("te_regressor_two_targets", [(0, 0.25), (1, -1.5), (1, 3.0), (0, 0.75)], 2, "SUM", [1.0, -2.0]),
        te_regressor("te_regressor_target_without_votes", [(0, 0.25), (0, -1.5), (0, 3.0), (0, 0.75)], 2, "SUM", [1.0, -2.0]),
        te_regressor("te_regressor_average", one_target, 1, "AVERAGE", [10.0]),
        te_regressor("te_regressor_min", one_target, 1, "MIN", [10.0]),
        te_regressor("te_regressor_max", one_target, 1, "MAX", [10.0]),
    ]
    out = [(m.graph.name, m, TE_GRID) for m in models]
    grid = TE_GRID[~np.isnan(TE_GRID).any(axis=1)]
    out += [(m.graph.name, m, grid) for m in liblinear_svms()]
    return out


def svm_liblinear(name, labels, coefficients, rho, post) -> onnx.ModelProto:
    """An SVMClassifier in liblinear's layout (no support vectors: one weight row per class),
    which skl2onnx does not write but ONNX Runtime serves."""
    node = helper.make_node(
        "SVMClassifier",
        ["X"],
        ["label", "probabilities"],
        domain="ai.onnx.ml",
        classlabels_ints=labels,
        coefficients=coefficients,
        rho=rho,
        kernel_type="LINEAR",
        kernel_params=[0.0, 0.0, 0.0],
        post_transform=post,
    )
    return _te_model(
        name,
        node,
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, len(labels)]),
        ],
    )


def liblinear_svms() -> list[onnx.ModelProto]:
    """Two classes with mixed-sign and with non-negative weights (ONNX Runtime's label rules
    differ), three classes with a post-transform."""
    return [
        svm_liblinear("svm_liblinear_binary_mixed", [0, 1], [0.5, -1.0, -0.25, 0.75], [0.1], "NONE"),
        svm_liblinear("svm_liblinear_binary_positive", [3, 7], [0.5, 0.25, 0.1, 0.4], [0.05], "NONE"),
        svm_liblinear(
            "svm_liblinear_multiclass", [5, 6, 7], [0.5, -1.0, -0.25, 0.75, 0.3, 0.2], [0.1], "SOFTMAX"
        ),
    ]


# ---------------------------------------------------------------------------------------
# scikit-learn exports
# ---------------------------------------------------------------------------------------


def no_zipmap(est) -> dict:
    final = est.steps[-1][1] if hasattr(est, "steps") else est
    return {type(final): {"zipmap": False}}


def build() -> list[tuple[str, object, np.ndarray, dict | None, np.ndarray | None]]:
    """(name, estimator, X, options, fixture rows or None for `rows(len(X))` of X)."""
    bc = load_breast_cancer()
    Xc, yc = bc.data.astype(np.float64), bc.target
    db = load_diabetes()
    Xr, yr = db.data.astype(np.float64), db.target
    iris = load_iris()
    Xi, yi = iris.data.astype(np.float64), iris.target
    wine = load_wine()
    Xw, yw = wine.data.astype(np.float64), wine.target

    fixtures = []

    def add(name, est, X, y, options=None, x_rows=None):
        est.fit(X, y)
        final = est.steps[-1][1] if hasattr(est, "steps") else est
        if options is None and is_classifier(final):
            options = no_zipmap(est)
        fixtures.append((name, est, X, options, x_rows))

    fixtures.append(("scaler", StandardScaler().fit(Xc), Xc, None, None))
    add("logreg_pipeline", logreg_pipeline(), Xc, yc)
    add("gbr", GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=SEED), Xr, yr)
    add("gbc_binary", GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=SEED), Xc, yc)
    add("rf_binary", RandomForestClassifier(n_estimators=10, max_depth=4, random_state=SEED), Xc, yc)
    fixtures.append(("logreg_zipmap", logreg_pipeline().fit(Xc, yc), Xc, None, None))
    fixtures.append(("binarizer", make_pipeline(StandardScaler(), Binarizer()).fit(Xc), Xc, None, None))
    # Multi-class tree ensembles: gradient boosting is written with post_transform SOFTMAX.
    add("gbc_multiclass", GradientBoostingClassifier(n_estimators=10, max_depth=3, random_state=SEED), Xw, yw)
    add("rf_multiclass", RandomForestClassifier(n_estimators=10, max_depth=4, random_state=SEED), Xw, yw)
    # k-nearest neighbours (Scan, TopK largest=0, ArrayFeatureExtractor, ...).
    add("knn_binary", scaled(KNeighborsClassifier(n_neighbors=5)), Xc, yc)
    add("knn_multiclass", scaled(KNeighborsClassifier(n_neighbors=7)), Xi, yi)
    add("knn_distance_multiclass", scaled(KNeighborsClassifier(n_neighbors=5, weights="distance")), Xw, yw)
    add("knn_regressor", scaled(KNeighborsRegressor(n_neighbors=5)), Xr, yr)
    # SVMs: SVMClassifier / SVMRegressor.
    for kernel in ("linear", "rbf", "poly", "sigmoid"):
        add(f"svc_{kernel}_binary", scaled(SVC(kernel=kernel, random_state=SEED)), Xc, yc)
        add(f"svc_{kernel}_multiclass_prob", scaled(SVC(kernel=kernel, probability=True, random_state=SEED)), Xw, yw)
    add("svc_rbf_binary_prob", scaled(SVC(probability=True, random_state=SEED)), Xc, yc)
    add("svc_rbf_multiclass", scaled(SVC(random_state=SEED)), Xi, yi)
    add("nusvc_multiclass_prob", scaled(NuSVC(probability=True, random_state=SEED)), Xi, yi)
    add("svr_rbf", scaled(SVR()), Xr, yr)
    add("svr_poly", scaled(SVR(kernel="poly")), Xr, yr)
    add("nusvr_linear", scaled(NuSVR(kernel="linear")), Xr, yr)
    add("one_class_svm", scaled(OneClassSVM(nu=0.2)), Xw, None)
    # SimpleImputer (Imputer): NaN in the training data and in the fixture rows.
    Xc_nan = with_missing(Xc, np.nan)
    for strategy in ("mean", "median", "most_frequent", "constant"):
        add(
            f"imputer_{strategy}",
            make_pipeline(SimpleImputer(strategy=strategy, fill_value=-1.0), StandardScaler(), LogisticRegression(max_iter=5000)),
            Xc_nan,
            yc,
        )
    Xr_sentinel = with_missing(Xr, -999.0)
    add("imputer_numeric_missing", make_pipeline(SimpleImputer(missing_values=-999.0), GradientBoostingRegressor(n_estimators=10, random_state=SEED)), Xr_sentinel, yr)
    return fixtures


def write_fixture(name: str, onx: onnx.ModelProto, x: np.ndarray) -> None:
    onnx.checker.check_model(onx, full_check=True)
    model_bytes = onx.SerializeToString()
    (OUT / f"{name}.onnx").write_bytes(model_bytes)

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    results = sess.run(names, {"X": x})

    outputs = {}
    for oname, value in zip(names, results):
        if isinstance(value, list):  # ZipMap: list of {class: prob}
            keys = sorted(value[0].keys())
            dense = np.array([[d[k] for k in keys] for d in value], dtype=np.float32)
            outputs[oname] = {"datatype": "FP32", "shape": list(dense.shape), "data": f32_list(dense)}
            continue
        value = np.asarray(value)
        if value.dtype == np.float32:
            outputs[oname] = {"datatype": "FP32", "shape": list(value.shape), "data": f32_list(value)}
        elif value.dtype == np.int64:
            outputs[oname] = {
                "datatype": "INT64",
                "shape": list(value.shape),
                "data": [int(v) for v in value.ravel()],
            }
        else:
            raise SystemExit(f"{name}: unexpected output dtype {value.dtype} for {oname}")

    fixture = {
        "model": f"{name}.onnx",
        "inputs": {"X": {"shape": list(x.shape), "data": f32_list(x)}},
        "outputs": outputs,
    }
    json_text = json.dumps(fixture, separators=(",", ":"), allow_nan=False) + "\n"
    (OUT / f"{name}.json").write_text(json_text, encoding="utf-8")

    for path_size in (len(model_bytes), len(json_text.encode())):
        assert path_size < MAX_BYTES, (name, path_size)
    ops = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in onx.graph.node})
    out_desc = {k: (v["datatype"], v["shape"]) for k, v in outputs.items()}
    print(f"{name:28s} ops={ops} onnx={len(model_bytes)}B json={len(json_text)}B outputs={out_desc}")


def main() -> int:
    # scikit-learn 1.9 deprecates SVC(probability=True); the fixtures cover models users have.
    warnings.filterwarnings("ignore", category=FutureWarning)
    OUT.mkdir(parents=True, exist_ok=True)
    names = []
    for name, est, X, options, x_rows in build():
        n_features = X.shape[1]
        onx = convert_sklearn(
            est,
            name=name,
            initial_types=[("X", FloatTensorType([None, n_features]))],
            options=options or None,
            target_opset=TARGET_OPSET,
        )
        dedupe_opsets(onx)
        x = (X[rows(len(X))] if x_rows is None else x_rows).astype(np.float32)
        write_fixture(name, onx, x)
        names.append(name)
    for name, onx, x in hand_built():
        write_fixture(name, onx, x)
        names.append(name)
    stale = sorted({p.stem for p in OUT.glob("*.json")} - set(names))
    if stale:
        print(f"note: fixtures not written by this script: {stale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
