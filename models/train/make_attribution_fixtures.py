#!/usr/bin/env python3
"""Expected logit-space attributions of the linear-logistic reference bundles, computed in
float64 with numpy straight from the ONNX graph (the `onnx` package reads the Scaler's
offset/scale and the LinearClassifier's coefficients/intercepts), independently of the Rust
code under test (nightingale_inference::explain and the CDS risk cards).

    .venv/bin/python models/train/make_attribution_fixtures.py

writes tests/fixtures/attribution/<bundle>.json: for a few fixed inputs x, the contributions
w_i * s_i * (x_i - mean_i) (mean = the bundle's [attribution] means), logit(x), the
reference's logit, and onnxruntime's P(positive) for x. The inputs are rounded to float32 first,
as the model sees them. Deterministic: re-running rewrites identical files.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "fixtures" / "attribution"

INPUTS = {
    # age, systolic BP, heart rate, female, infection, emergency
    "icu-mortality": [
        [81.0, 88.0, 124.0, 1.0, 1.0, 1.0],
        [35.0, 150.0, 70.0, 0.0, 0.0, 0.0],
        [62.0, 130.6, 101.0, 0.0, 1.0, 1.0],
    ],
    # pregnancies, glucose, diastolic BP, triceps, BMI, pedigree, age
    "pima-diabetes": [
        [6.0, 148.0, 72.0, 35.0, 33.6, 0.627, 50.0],
        [1.0, 85.0, 66.0, 29.0, 26.6, 0.351, 31.0],
    ],
}


def linear(model: onnx.ModelProto, n: int, positive: int):
    nodes = {n.op_type: n for n in model.graph.node}
    attrs = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    sc, lc = attrs(nodes["Scaler"]), attrs(nodes["LinearClassifier"])
    assert lc["post_transform"] == b"LOGISTIC"
    offset = np.asarray(sc["offset"], dtype=np.float32).astype(np.float64)
    scale = np.asarray(sc["scale"], dtype=np.float32).astype(np.float64)
    coef = np.asarray(lc["coefficients"], dtype=np.float32).astype(np.float64).reshape(-1, n)
    icpt = np.asarray(lc["intercepts"], dtype=np.float32).astype(np.float64)
    return offset, scale, coef[positive], float(icpt[positive])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for bundle, xs in INPUTS.items():
        bdir = REPO / "models" / "bundles" / bundle
        manifest = tomllib.loads((bdir / "bundle.toml").read_text(encoding="utf-8"))
        means = np.asarray(manifest["attribution"]["means"], dtype=np.float64)
        probs = next(o for o in manifest["outputs"] if o.get("positive_label"))
        positive = probs["labels"].index(probs["positive_label"])
        path = bdir / "1" / "model.onnx"
        n = len(means)
        offset, scale, w, b = linear(onnx.load(path), n, positive)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logit = lambda v: float(b + np.sum(w * (v - offset) * scale))  # noqa: E731
        cases = []
        for x in xs:
            x32 = np.asarray(x, dtype=np.float32)
            x64 = x32.astype(np.float64)
            (_, p) = session.run(None, {"features": x32[None, :]})
            cases.append(
                {
                    "x": [float(v) for v in x64],
                    "contributions": [float(c) for c in w * scale * (x64 - means)],
                    "logit": logit(x64),
                    "onnxruntime_probability": float(p[0, positive]),
                }
            )
        doc = {
            "bundle": bundle,
            "version": 1,
            "positive_column": positive,
            "reference": [float(m) for m in means],
            "reference_logit": logit(means),
            "cases": cases,
        }
        (OUT / f"{bundle}.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(f"{bundle}: {len(cases)} cases")


if __name__ == "__main__":
    main()
