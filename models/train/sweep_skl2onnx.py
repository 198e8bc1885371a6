#!/usr/bin/env python3
"""Sweep: which scikit-learn estimators, exported by skl2onnx, Nightingale's tract engine
serves exactly as onnxruntime does.

For every estimator in `estimators()` this script fits it on a small package dataset
(breast cancer for binary, wine for multi-class classification, diabetes for regression,
small integer codes for the encoders; about one value in ten set missing for the imputers),
exports it with skl2onnx (opset 17, ai.onnx.ml 3, classifiers with `zipmap=False`), runs 20
rows through onnxruntime and through tract (the `onnx_ml_run` example of the inference crate:
the 20 rows as one batch, then each row alone on the same loaded instance, as a worker
serves requests), and compares every output with onnxruntime's: labels exactly, floats
within 1e-5 (relative once the value exceeds 1), as `inference/tests/onnx_ml.rs` does. One
row per estimator: `equal`, `DIFFERS` (where), `tract fails to load` / `tract fails to run`
(tract's error), or `no export` (skl2onnx cannot convert it).

  .venv/bin/python models/train/sweep_skl2onnx.py [--markdown table.md] [--only NAME...] [--no-build]

It builds the example first (`cargo build -p nightingale-inference --example onnx_ml_run`).
Everything is seeded; the table in docs/onnx-ml.md is its `--markdown` output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import is_classifier

from common import dedupe_opsets

REPO = Path(__file__).resolve().parents[2]
SEED = 20261201
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
TOLERANCE = 1e-5
N_ROWS = 20


def datasets():
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine

    bc = load_breast_cancer()
    wine = load_wine()
    db = load_diabetes()
    return {
        "binary": (bc.data.astype(np.float32), bc.target),
        "multiclass": (wine.data.astype(np.float32), wine.target),
        "regression": (db.data.astype(np.float32), db.target.astype(np.float32)),
    }


def estimators():
    """(name, task, factory, missing) — `missing`: put NaNs into the rows (imputers)."""
    from sklearn import (
        calibration,
        cluster,
        cross_decomposition,
        decomposition,
        discriminant_analysis,
        ensemble,
        feature_selection,
        impute,
        kernel_approximation,
        linear_model,
        naive_bayes,
        neighbors,
        neural_network,
        pipeline,
        preprocessing,
        svm,
        tree,
    )

    S = SEED
    scaled = lambda est: pipeline.make_pipeline(preprocessing.StandardScaler(), est)  # noqa: E731
    minmax = lambda est: pipeline.make_pipeline(preprocessing.MinMaxScaler(), est)  # noqa: E731
    out = []

    def clf(name, factory, tasks=("binary", "multiclass"), missing=False):
        for t in tasks:
            out.append((f"{name} ({t})", t, factory, missing))

    def reg(name, factory, missing=False):
        out.append((name, "regression", factory, missing))

    def tr(name, factory, missing=False, task="binary"):
        out.append((name, task, factory, missing))

    # Linear models
    clf("LogisticRegression", lambda: scaled(linear_model.LogisticRegression(max_iter=2000)))
    clf("SGDClassifier(log_loss)", lambda: scaled(linear_model.SGDClassifier(loss="log_loss", random_state=S)))
    clf("SGDClassifier(hinge)", lambda: scaled(linear_model.SGDClassifier(random_state=S)))
    clf("RidgeClassifier", lambda: scaled(linear_model.RidgeClassifier()))
    clf("Perceptron", lambda: scaled(linear_model.Perceptron(random_state=S)))
    clf("LinearSVC", lambda: scaled(svm.LinearSVC(random_state=S)))
    clf("LinearDiscriminantAnalysis", lambda: discriminant_analysis.LinearDiscriminantAnalysis())
    reg("LinearRegression", lambda: linear_model.LinearRegression())
    reg("Ridge", lambda: linear_model.Ridge())
    reg("Lasso", lambda: linear_model.Lasso(alpha=0.1))
    reg("ElasticNet", lambda: linear_model.ElasticNet(alpha=0.01))
    reg("SGDRegressor", lambda: scaled(linear_model.SGDRegressor(random_state=S)))
    reg("BayesianRidge", lambda: linear_model.BayesianRidge())
    reg("HuberRegressor", lambda: scaled(linear_model.HuberRegressor(max_iter=1000)))
    reg("LinearSVR", lambda: scaled(svm.LinearSVR(random_state=S, max_iter=5000)))
    reg("PLSRegression", lambda: cross_decomposition.PLSRegression(n_components=3))
    # Trees and ensembles
    clf("DecisionTreeClassifier", lambda: tree.DecisionTreeClassifier(max_depth=5, random_state=S))
    clf("RandomForestClassifier", lambda: ensemble.RandomForestClassifier(n_estimators=10, max_depth=5, random_state=S))
    clf("ExtraTreesClassifier", lambda: ensemble.ExtraTreesClassifier(n_estimators=10, max_depth=5, random_state=S))
    clf("GradientBoostingClassifier", lambda: ensemble.GradientBoostingClassifier(n_estimators=10, max_depth=3, random_state=S))
    clf("AdaBoostClassifier", lambda: ensemble.AdaBoostClassifier(n_estimators=10, random_state=S))
    clf("BaggingClassifier", lambda: ensemble.BaggingClassifier(n_estimators=5, random_state=S))
    clf("HistGradientBoostingClassifier", lambda: ensemble.HistGradientBoostingClassifier(max_iter=10, random_state=S))
    reg("DecisionTreeRegressor", lambda: tree.DecisionTreeRegressor(max_depth=5, random_state=S))
    reg("RandomForestRegressor", lambda: ensemble.RandomForestRegressor(n_estimators=10, max_depth=5, random_state=S))
    reg("ExtraTreesRegressor", lambda: ensemble.ExtraTreesRegressor(n_estimators=10, max_depth=5, random_state=S))
    reg("GradientBoostingRegressor", lambda: ensemble.GradientBoostingRegressor(n_estimators=10, random_state=S))
    reg("AdaBoostRegressor", lambda: ensemble.AdaBoostRegressor(n_estimators=10, random_state=S))
    reg("HistGradientBoostingRegressor", lambda: ensemble.HistGradientBoostingRegressor(max_iter=10, random_state=S))
    # Neighbours
    clf("KNeighborsClassifier", lambda: scaled(neighbors.KNeighborsClassifier()))
    clf("KNeighborsClassifier(distance)", lambda: scaled(neighbors.KNeighborsClassifier(weights="distance")))
    reg("KNeighborsRegressor", lambda: scaled(neighbors.KNeighborsRegressor()))
    clf("NearestCentroid", lambda: scaled(neighbors.NearestCentroid()))
    # Naive Bayes
    clf("GaussianNB", lambda: naive_bayes.GaussianNB())
    clf("MultinomialNB", lambda: minmax(naive_bayes.MultinomialNB()))
    clf("ComplementNB", lambda: minmax(naive_bayes.ComplementNB()))
    clf("BernoulliNB", lambda: scaled(naive_bayes.BernoulliNB()))
    # SVM
    for k in ("linear", "rbf", "poly", "sigmoid"):
        clf(f"SVC({k})", lambda k=k: scaled(svm.SVC(kernel=k, random_state=S)))
        clf(f"SVC({k}, probability)", lambda k=k: scaled(svm.SVC(kernel=k, probability=True, random_state=S)))
    clf("NuSVC(rbf, probability)", lambda: scaled(svm.NuSVC(probability=True, random_state=S)))
    reg("SVR(rbf)", lambda: scaled(svm.SVR()))
    reg("SVR(linear)", lambda: scaled(svm.SVR(kernel="linear")))
    reg("SVR(poly)", lambda: scaled(svm.SVR(kernel="poly")))
    reg("NuSVR", lambda: scaled(svm.NuSVR()))
    tr("OneClassSVM", lambda: scaled(svm.OneClassSVM(nu=0.2)))
    # Neural networks
    clf("MLPClassifier", lambda: scaled(neural_network.MLPClassifier(hidden_layer_sizes=(16,), max_iter=500, random_state=S)))
    reg("MLPRegressor", lambda: scaled(neural_network.MLPRegressor(hidden_layer_sizes=(16,), max_iter=500, random_state=S)))
    # Meta-estimators
    clf("CalibratedClassifierCV(LinearSVC)", lambda: scaled(calibration.CalibratedClassifierCV(svm.LinearSVC(random_state=S), cv=3)))
    clf("CalibratedClassifierCV(isotonic)", lambda: scaled(calibration.CalibratedClassifierCV(linear_model.LogisticRegression(max_iter=2000), cv=3, method="isotonic")))
    clf(
        "VotingClassifier(soft)",
        lambda: scaled(ensemble.VotingClassifier([("lr", linear_model.LogisticRegression(max_iter=2000)), ("dt", tree.DecisionTreeClassifier(max_depth=3, random_state=S))], voting="soft", flatten_transform=False)),
    )
    clf(
        "VotingClassifier(hard)",
        lambda: scaled(ensemble.VotingClassifier([("lr", linear_model.LogisticRegression(max_iter=2000)), ("dt", tree.DecisionTreeClassifier(max_depth=3, random_state=S)), ("nb", naive_bayes.GaussianNB())], voting="hard", flatten_transform=False)),
    )
    clf(
        "StackingClassifier",
        lambda: scaled(ensemble.StackingClassifier([("lr", linear_model.LogisticRegression(max_iter=2000)), ("dt", tree.DecisionTreeClassifier(max_depth=3, random_state=S))], cv=3)),
    )
    reg("VotingRegressor", lambda: ensemble.VotingRegressor([("lr", linear_model.LinearRegression()), ("dt", tree.DecisionTreeRegressor(max_depth=3, random_state=S))]))
    reg("StackingRegressor", lambda: ensemble.StackingRegressor([("lr", linear_model.Ridge()), ("dt", tree.DecisionTreeRegressor(max_depth=3, random_state=S))], cv=3))
    # Preprocessing and decomposition
    tr("StandardScaler", lambda: preprocessing.StandardScaler())
    tr("MinMaxScaler", lambda: preprocessing.MinMaxScaler())
    tr("RobustScaler", lambda: preprocessing.RobustScaler())
    tr("MaxAbsScaler", lambda: preprocessing.MaxAbsScaler())
    for norm in ("l1", "l2", "max"):
        tr(f"Normalizer({norm})", lambda norm=norm: preprocessing.Normalizer(norm=norm))
    tr("Binarizer", lambda: pipeline.make_pipeline(preprocessing.StandardScaler(), preprocessing.Binarizer()))
    tr("KBinsDiscretizer(onehot-dense)", lambda: preprocessing.KBinsDiscretizer(n_bins=4, encode="onehot-dense", strategy="quantile"))
    tr("KBinsDiscretizer(ordinal)", lambda: preprocessing.KBinsDiscretizer(n_bins=4, encode="ordinal", strategy="uniform"))
    tr("PolynomialFeatures", lambda: pipeline.make_pipeline(preprocessing.StandardScaler(), preprocessing.PolynomialFeatures(degree=2)))
    tr("PCA", lambda: decomposition.PCA(n_components=5, random_state=S))
    tr("PCA(whiten)", lambda: decomposition.PCA(n_components=5, whiten=True, random_state=S))
    tr("TruncatedSVD", lambda: decomposition.TruncatedSVD(n_components=5, random_state=S))
    tr("VarianceThreshold", lambda: feature_selection.VarianceThreshold(threshold=0.01))
    tr("SelectKBest", lambda: feature_selection.SelectKBest(k=5))
    tr("KMeans", lambda: pipeline.make_pipeline(preprocessing.StandardScaler(), cluster.KMeans(n_clusters=3, n_init=3, random_state=S)))
    tr("RBFSampler", lambda: kernel_approximation.RBFSampler(n_components=8, random_state=S))
    tr("OneHotEncoder(integers)", lambda: preprocessing.OneHotEncoder(handle_unknown="ignore", sparse_output=False), task="integers")
    tr("OrdinalEncoder(integers)", lambda: preprocessing.OrdinalEncoder(), task="integers")
    # Imputers (rows with NaN)
    for strategy in ("mean", "median", "most_frequent", "constant"):
        tr(
            f"SimpleImputer({strategy}) + LogisticRegression",
            lambda strategy=strategy: pipeline.make_pipeline(
                impute.SimpleImputer(strategy=strategy, fill_value=0.0), preprocessing.StandardScaler(), linear_model.LogisticRegression(max_iter=2000)
            ),
            missing=True,
        )
    tr("SimpleImputer(missing_values=-1)", lambda: impute.SimpleImputer(missing_values=-1.0, strategy="mean"), missing=True)
    tr("IsolationForest", lambda: ensemble.IsolationForest(n_estimators=10, random_state=S))
    return out


def with_missing(X: np.ndarray, sentinel: float = np.nan) -> np.ndarray:
    X = X.copy()
    rng = np.random.default_rng(SEED)
    mask = rng.random(X.shape) < 0.1
    X[mask] = sentinel
    return X


def rows(n_total: int) -> np.ndarray:
    return np.linspace(0, n_total - 1, N_ROWS).round().astype(np.int64)


def export(est, n_features: int) -> onnx.ModelProto:
    """skl2onnx export; classifiers that have probabilities get `zipmap=False` (dense output)."""
    final = est.steps[-1][1] if hasattr(est, "steps") else est
    options = {type(final): {"zipmap": False}} if is_classifier(final) else None
    types = [("X", FloatTensorType([None, n_features]))]
    try:
        onx = convert_sklearn(est, initial_types=types, target_opset=TARGET_OPSET, options=options)
    except NameError:  # converters without a `zipmap` option (LinearSVC): they write no ZipMap
        onx = convert_sklearn(est, initial_types=types, target_opset=TARGET_OPSET)
    dedupe_opsets(onx)
    return onx


def run_tract(runner: Path, model: Path, x: np.ndarray) -> list[dict] | dict:
    """tract's outputs for the whole batch, then for each row alone on the same instance (as a
    worker serves requests): a list of {output name: output} per call, or {"error": ...}."""
    paths = []
    for part in [x] + [x[i : i + 1] for i in range(len(x))]:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"shape": list(part.shape), "data": [None if np.isnan(v) else float(v) for v in part.ravel()]}, f)
            paths.append(f.name)
    proc = subprocess.run([str(runner), str(model), *paths], capture_output=True, text=True, timeout=300)
    for p in paths:
        Path(p).unlink()
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "panicked" in line or line.startswith("Error")]
        return {"error": ("run", (lines or [f"exit {proc.returncode}"])[-1] + " " + proc.stderr.split("panicked")[-1][:200].strip())}
    calls: list[dict] = [{} for _ in paths]
    for line in proc.stdout.splitlines():
        d = json.loads(line)
        if "error" in d:
            return {"error": (d.get("stage", "load"), d["error"])}
        calls[d["call"]][d["name"]] = d
    return calls


def compare(ort_outs: dict, tract_outs: dict) -> tuple[str, str]:
    worst = 0.0
    for name, value in ort_outs.items():
        if name not in tract_outs:
            return "DIFFERS", f"no output {name!r}"
        t = tract_outs[name]
        if isinstance(value, list):  # a ZipMap slipped through
            return "DIFFERS", f"{name} is a sequence of maps"
        value = np.asarray(value)
        if list(value.shape) != t["shape"]:
            return "DIFFERS", f"{name}: shape {t['shape']} vs onnxruntime {list(value.shape)}"
        if value.dtype.kind in "OSU":
            got = [str(v) for v in t["data"]]
            if got != [str(v) for v in value.ravel()]:
                return "DIFFERS", f"{name}: labels differ"
            continue
        tv = np.array([np.nan if v is None else v for v in t["data"]], dtype=np.float64)
        ov = value.astype(np.float64).ravel()
        if value.dtype.kind in "iub":
            if not np.array_equal(tv, ov):
                return "DIFFERS", f"{name}: {int(np.sum(tv != ov))} of {ov.size} labels differ"
            continue
        nan_mismatch = np.isnan(tv) != np.isnan(ov)
        if nan_mismatch.any():
            return "DIFFERS", f"{name}: NaN where onnxruntime has none (or the reverse)"
        diff = np.abs(tv - ov)
        d = float(np.nanmax(diff)) if ov.size else 0.0
        worst = max(worst, d)
        # As tests/onnx_ml.rs: 1e-5, relative to the value once it exceeds 1.
        if np.any(diff > TOLERANCE * np.maximum(1.0, np.abs(ov))):
            return "DIFFERS", f"{name}: max abs diff {d:.3g}"
    return "equal", f"max abs diff {worst:.1e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    ap.add_argument("--only", nargs="*", help="only estimators whose name contains one of these")
    ap.add_argument("--keep", type=Path, help="keep the exported models in this directory")
    ap.add_argument("--no-build", action="store_true", help="use the example binary as it is")
    args = ap.parse_args()

    if not args.no_build:
        subprocess.run(
            ["cargo", "build", "-q", "-p", "nightingale-inference", "--example", "onnx_ml_run"], cwd=REPO, check=True
        )
    metadata = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=REPO, capture_output=True, text=True, check=True
    )
    target = Path(json.loads(metadata.stdout)["target_directory"])
    runner = target / "debug" / "examples" / "onnx_ml_run"

    data = datasets()
    rng = np.random.default_rng(SEED)
    integers = rng.integers(0, 4, size=(200, 3)).astype(np.float32)
    data["integers"] = (integers, (integers.sum(axis=1) > 4).astype(np.int64))
    warnings.filterwarnings("ignore")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    table = []
    for name, task, factory, missing in estimators():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        X, y = data["binary" if task not in data else task]
        if missing:
            X = with_missing(X, -1.0 if "missing_values=-1" in name else np.nan)
        est = factory()
        est.fit(X, y)
        try:
            onx = export(est, X.shape[1])
        except Exception as e:  # skl2onnx's errors are of many kinds
            table.append((name, "no export", f"skl2onnx: {type(e).__name__}: {str(e).splitlines()[0][:120]}", ""))
            print(f"{name:48s} no export ({type(e).__name__})", flush=True)
            continue
        ops = sorted({n.op_type for n in onx.graph.node} - {"Identity"})
        path = workdir / (name.replace(" ", "_").replace("/", "_") + ".onnx")
        path.write_bytes(onx.SerializeToString())
        x = X[rows(len(X))].astype(np.float32)
        sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        ort_outs = dict(zip(names, sess.run(names, {"X": x})))
        calls = run_tract(runner, path, x)
        if isinstance(calls, dict):
            stage, msg = calls["error"]
            verdict, detail = f"tract fails to {stage}", msg[:160]
        else:
            verdict, detail = compare(ort_outs, calls[0])
            # Each row alone, after the batch, against onnxruntime's answer for that row.
            for i, single in enumerate(calls[1:]):
                if verdict != "equal":
                    break
                ort_row = dict(zip(names, sess.run(names, {"X": x[i : i + 1]})))
                v, d = compare(ort_row, single)
                if v != "equal":
                    verdict, detail = v, f"row {i} alone after the batch: {d}"
        table.append((name, verdict, detail, ", ".join(ops)))
        print(f"{name:48s} {verdict:22s} {detail}", flush=True)

    if args.markdown:
        lines = ["| estimator (skl2onnx export) | tract vs onnxruntime | detail | ONNX ops |", "|---|---|---|---|"]
        for name, verdict, detail, ops in table:
            lines.append(f"| {name} | {verdict} | {detail.replace('|', '/')} | {ops} |")
        args.markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts = {}
    for _, verdict, _, _ in table:
        counts[verdict] = counts.get(verdict, 0) + 1
    print("summary:", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
