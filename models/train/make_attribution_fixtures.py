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

It also writes a NON-linear test bundle, tests/fixtures/attribution/icu-mortality-gbm/ (a
scikit-learn gradient-boosting classifier on the icu-mortality bundle's training split,
exported with skl2onnx; the icu-mortality manifest with its FHIR mapping and KernelSHAP
background), and tests/fixtures/attribution/icu-mortality-gbm.json: the exact Shapley values
of the game v(S) = mean over the background rows b of logit P(died | x_S, b_S̄), by
enumerating every coalition in numpy with onnxruntime scoring each row: what the CDS risk
card of a model that is not linear-logistic must show (KernelSHAP with every coalition).
The GBM is a test fixture, not a reference model: it is not validated and ships in no
repository a server loads by default.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
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


GBM_CASES = INPUTS["icu-mortality"]


def shapley_logit(session, x: np.ndarray, background: np.ndarray, positive: int) -> tuple[list[float], float, float]:
    """Exact Shapley values of v(S) = mean_b logit f(x_S, b_not S) by enumeration; returns
    (values, v(empty) = mean logit of the background, v(all) = logit f(x))."""
    m = len(x)
    value: dict[tuple[bool, ...], float] = {}
    for mask in itertools.product([False, True], repeat=m):
        rows = np.where(np.asarray(mask)[None, :], x[None, :], background).astype(np.float32)
        (_, p) = session.run(None, {"features": rows})
        q = np.clip(p[:, positive].astype(np.float64), 1e-12, 1 - 1e-12)
        value[mask] = float(np.mean(np.log(q / (1 - q))))
    phi = []
    for i in range(m):
        total = 0.0
        for mask, v in value.items():
            if mask[i]:
                continue
            s = sum(mask)
            with_i = tuple(True if j == i else mask[j] for j in range(m))
            weight = math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m)
            total += weight * (value[with_i] - v)
        phi.append(total)
    return phi, value[(False,) * m], value[(True,) * m]


def gbm_fixture() -> None:
    """The non-linear icu-mortality test bundle and its expected card attributions."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # noqa: PLC0415
    import icu_mortality  # noqa: PLC0415
    from sklearn.ensemble import GradientBoostingClassifier  # noqa: PLC0415

    ds = icu_mortality.load()
    split = common.stratified_split(ds.y, icu_mortality.SEED)
    gbm = GradientBoostingClassifier(n_estimators=40, max_depth=2, learning_rate=0.1, random_state=0)
    gbm.fit(ds.X[split.train], ds.y[split.train])
    bdir = OUT / "icu-mortality-gbm"
    model_path = bdir / "1" / "model.onnx"
    common.export_onnx(
        gbm,
        "icu_mortality_gbm",
        ds.X.shape[1],
        "TEST FIXTURE: gradient boosting (40 trees of depth 2) on the icu-mortality training split; not validated",
        model_path,
    )
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (_, p_skl) = (None, gbm.predict_proba(ds.X[split.test].astype(np.float32)))
    (_, p_ort) = session.run(None, {"features": ds.X[split.test].astype(np.float32)})
    assert np.max(np.abs(p_skl - p_ort)) < 1e-5, np.max(np.abs(p_skl - p_ort))

    # The manifest: icu-mortality's (features, FHIR mapping, threshold, [explain] background),
    # up to its self-test, versions and validation gates, renamed, with this model's checksum.
    text = (REPO / "models" / "bundles" / "icu-mortality" / "bundle.toml").read_text(encoding="utf-8")
    text = text[: text.index("[selftest]")].rstrip() + "\n"
    first, rest = text.split("\n", 1)
    assert first.startswith("# Generated by"), first
    rest = rest.replace('name = "icu-mortality"', 'name = "icu-mortality-gbm"', 1)
    manifest = tomllib.loads(rest)
    old_description = manifest["description"]
    rest = rest.replace(
        old_description,
        "TEST FIXTURE (not a reference model): gradient boosting on the icu-mortality inputs, for "
        "the CDS risk card's KernelSHAP factors of a model that is not linear-logistic.",
        1,
    )
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    header = (
        "# Generated by models/train/make_attribution_fixtures.py -- a test fixture, not a reference bundle;\n"
        "# edit the script, not this file.\n"
    )
    versions = (
        "\n[versions.1]\n"
        'description = "GradientBoostingClassifier(n_estimators=40, max_depth=2) on the icu-mortality training split, skl2onnx; TEST FIXTURE"\n'
        'created = "2026-12-02"\n\n'
        "[versions.1.files]\n"
        f'"model.onnx" = "{digest}"\n'
    )
    (bdir / "bundle.toml").write_text(header + rest + versions, encoding="utf-8")
    manifest = tomllib.loads(rest)
    background = np.asarray(manifest["explain"]["background"], dtype=np.float32).astype(np.float64)
    probs = next(o for o in manifest["outputs"] if o.get("positive_label"))
    positive = probs["labels"].index(probs["positive_label"])

    cases = []
    for x in GBM_CASES:
        x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
        (_, p) = session.run(None, {"features": x64[None, :].astype(np.float32)})
        # The card's inputs come from FHIR (e.g. 88 mmHg sent as kPa): no split may lie
        # within 0.01 of a continuous input, or a rounding would change the answer.
        for j in range(3):
            for d in (-0.01, 0.01):
                y = x64.copy()
                y[j] += d
                (_, q) = session.run(None, {"features": y[None, :].astype(np.float32)})
                assert q[0, positive] == p[0, positive], (x, j, d)
        phi, base, fx = shapley_logit(session, x64, background, positive)
        assert abs(sum(phi) - (fx - base)) < 1e-9
        cases.append(
            {
                "x": [float(v) for v in x64],
                "shapley_logit": phi,
                "logit": fx,
                "onnxruntime_probability": float(p[0, positive]),
            }
        )
    doc = {
        "bundle": "icu-mortality-gbm",
        "version": 1,
        "positive_column": positive,
        "background_rows": len(background),
        "background_mean_logit": base,
        "cases": cases,
    }
    (OUT / "icu-mortality-gbm.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"icu-mortality-gbm: {len(cases)} cases, background mean logit {base:.6f}")


if __name__ == "__main__":
    main()
    gbm_fixture()
