#!/usr/bin/env python3
"""Write ONNX-ML conformance fixtures for the ops Nightingale registers in tract.

For each fixture <name> this writes, into inference/tests/data/onnx-ml/:

  <name>.onnx   a small scikit-learn model exported by skl2onnx, input `X` FP32 [None, F]
  <name>.json   {"model": "<name>.onnx",
                 "inputs":  {"X": {"shape": [n, F], "data": [flat floats]}},
                 "outputs": {"<output>": {"datatype": "FP32"|"INT64", "shape": [...], "data": [flat]}}}

Expected outputs are onnxruntime's, on 20 rows of the data. Floats are written
as the shortest decimal that round-trips the float32 value, so parsing them as
f32 gives the exact tensor onnxruntime saw.

Fixtures: scaler, logreg_pipeline, gbr, gbc_binary, rf_binary, logreg_zipmap.
For logreg_zipmap the ZipMap output (a sequence of maps) is stored as a dense
FP32 [n, 2] array with columns ordered by class key.

Run with the repository venv:  .venv/bin/python models/train/make_op_fixtures.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_breast_cancer, load_diabetes

from common import dedupe_opsets
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

SEED = 20261124
N_ROWS = 20
MAX_BYTES = 200 * 1024
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "inference" / "tests" / "data" / "onnx-ml"


def rows(n_total: int) -> np.ndarray:
    """20 fixed, evenly spread row indices (both classes appear in breast cancer)."""
    return np.linspace(0, n_total - 1, N_ROWS).round().astype(np.int64)


def f32_list(a: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float32).ravel()]


def logreg_pipeline() -> Pipeline:
    return Pipeline(
        [("scaler", StandardScaler()), ("logreg", LogisticRegression(max_iter=5000))]
    )


def build() -> list[tuple[str, object, np.ndarray, np.ndarray, dict | None]]:
    bc = load_breast_cancer()
    Xc, yc = bc.data.astype(np.float64), bc.target
    db = load_diabetes()
    Xr, yr = db.data.astype(np.float64), db.target

    fixtures = []
    fixtures.append(("scaler", StandardScaler().fit(Xc), Xc, None))
    fixtures.append(
        ("logreg_pipeline", logreg_pipeline().fit(Xc, yc), Xc, {LogisticRegression: {"zipmap": False}})
    )
    fixtures.append(
        (
            "gbr",
            GradientBoostingRegressor(n_estimators=20, max_depth=3, random_state=SEED).fit(Xr, yr),
            Xr,
            None,
        )
    )
    fixtures.append(
        (
            "gbc_binary",
            GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=SEED).fit(Xc, yc),
            Xc,
            {GradientBoostingClassifier: {"zipmap": False}},
        )
    )
    fixtures.append(
        (
            "rf_binary",
            RandomForestClassifier(n_estimators=10, max_depth=4, random_state=SEED).fit(Xc, yc),
            Xc,
            {RandomForestClassifier: {"zipmap": False}},
        )
    )
    fixtures.append(("logreg_zipmap", logreg_pipeline().fit(Xc, yc), Xc, None))
    return fixtures


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, est, X, options in build():
        n_features = X.shape[1]
        onx = convert_sklearn(
            est,
            name=name,
            initial_types=[("X", FloatTensorType([None, n_features]))],
            options=options,
            target_opset=TARGET_OPSET,
        )
        dedupe_opsets(onx)
        onnx.checker.check_model(onx, full_check=True)
        model_bytes = onx.SerializeToString()
        (OUT / f"{name}.onnx").write_bytes(model_bytes)

        x = X[rows(len(X))].astype(np.float32)
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
        json_text = json.dumps(fixture, separators=(",", ":")) + "\n"
        (OUT / f"{name}.json").write_text(json_text, encoding="utf-8")

        for path_size in (len(model_bytes), len(json_text.encode())):
            assert path_size < MAX_BYTES, (name, path_size)
        ops = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in onx.graph.node})
        opsets = {o.domain or "ai.onnx": o.version for o in onx.opset_import}
        out_desc = {k: (v["datatype"], v["shape"]) for k, v in outputs.items()}
        print(
            f"{name:16s} ops={ops} ai.onnx.ml opset={opsets.get('ai.onnx.ml')} "
            f"ai.onnx opset={opsets.get('ai.onnx')} onnx={len(model_bytes)}B json={len(json_text)}B "
            f"outputs={out_desc}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
