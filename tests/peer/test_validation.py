"""`nightingale validate` (issue 11) against scikit-learn, statsmodels and onnxruntime.

* Exact definitions: onnxruntime scores each shipped tabular bundle's test split (rebuilt
  from its PyPI package where the data are GPL and not committed, as test_bundles.py does);
  the scores go to `validate --predictions` (so both sides see the same numbers) and every
  metric in report.json is compared with scikit-learn / statsmodels, or with an independent
  implementation here (DeLong by its O(m·n) structural components, net benefit from its
  definition), to 1e-9 (1e-6 for the iterative logistic fits).
* The served path: `validate --dataset` runs the same split through the bundle on the
  engine under test (NIGHTINGALE_BACKEND); its AUROC equals scikit-learn's on onnxruntime's
  scores within 1e-4, every prediction is in the run's audit trail, and the hash chain
  verifies.
* Edge cases, hostile files (NaN / inf / out-of-range predictions refused with the row
  number, unusable rows listed), reproducible bootstrap, the gate's exit codes (a
  deliberately worse version in a test repository fails it; the shipped versions pass),
  and the HTML report rendered by headless Chromium (no console errors; a screenshot in
  target/test-artifacts/validation).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
import statsmodels.api as sm
from statsmodels.stats.proportion import proportion_confint
from scipy.stats import norm

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "models" / "bundles"
BIN = Path(os.environ.get("NIGHTINGALE_BIN", REPO / "target" / "debug" / "nightingale"))
if not BIN.is_absolute():
    BIN = REPO / BIN
BACKEND = os.environ.get("NIGHTINGALE_BACKEND", "tract")
ARTIFACTS = REPO / "target" / "test-artifacts" / "validation"
EXACT = 1e-9
FIT = 1e-6
RUN_TIMEOUT_S = 300
CLIP = 1e-12


def _manifest(name: str) -> dict:
    return tomllib.loads((BUNDLES / name / "bundle.toml").read_text(encoding="utf-8"))


def _tabular() -> list[tuple[str, int]]:
    out = []
    for p in sorted(BUNDLES.glob("*/bundle.toml")):
        m = tomllib.loads(p.read_text(encoding="utf-8"))
        if m["task"] == "tabular-risk":
            out += [(m["name"], int(v)) for v in sorted(m["versions"], key=int)]
    return out


class Split:
    """A bundle's test split: features, 0/1 labels, subgroup columns."""

    def __init__(self, name: str, path: Path):
        m = _manifest(name)
        self.name = name
        self.path = path
        self.features = [f["name"] for f in m["inputs"][0]["features"]]
        out = next(o for o in m["outputs"] if o.get("positive_label"))
        self.positive = out["labels"].index(out["positive_label"])
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            self.header = reader.fieldnames
            rows = list(reader)
        self.x = np.array([[float(r[c]) for c in self.features] for r in rows], dtype=np.float32)
        self.y = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        after = self.header[self.header.index("label") + 1:]
        self.subgroups = [c for c in after if not c.startswith("expected_p_")]
        self.columns = {c: [r[c] for r in rows] for c in self.header}


@pytest.fixture(scope="session")
def splits(tmp_path_factory):
    cache: dict[str, Split] = {}

    def get(name: str) -> Split:
        if name not in cache:
            path = BUNDLES / name / "testdata" / "test.csv"
            if not path.exists():
                script = _manifest(name)["provenance"]["training_script"]
                path = tmp_path_factory.mktemp(f"split-{name}") / "test.csv"
                proc = subprocess.run(
                    [sys.executable, str(REPO / script), "--testdata-only", "--out", str(path)],
                    cwd=REPO, capture_output=True, text=True, timeout=300,
                )
                assert proc.returncode == 0, proc.stdout + proc.stderr
            cache[name] = Split(name, path)
        return cache[name]

    return get


def _scores(name: str, version: int, x: np.ndarray, positive: int) -> np.ndarray:
    sess = ort.InferenceSession(str(BUNDLES / name / str(version) / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    (prob,) = sess.run(["probabilities"], {"features": x})
    return prob[:, positive].astype(np.float64)


def validate(*args: str, out: Path, expect: int | None = 0) -> tuple[int, dict | None, str]:
    cmd = [str(BIN), "validate", "--out", str(out), "--quiet", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    text = proc.stdout + proc.stderr
    if expect is not None:
        assert proc.returncode == expect, f"{cmd}\nexit {proc.returncode}\n{text}"
    report = None
    if (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return proc.returncode, report, text


def write_predictions(path: Path, y, p, extra: dict[str, list[str]] | None = None) -> None:
    extra = extra or {}
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "score", *extra])
        for i, (yy, pp) in enumerate(zip(y, p)):
            w.writerow([int(yy), repr(float(pp)), *(extra[c][i] for c in extra)])


def delong_reference(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) directly: the structural components from every (positive,
    negative) pair's kernel ψ (1 above, ½ tied, 0 below)."""
    x, z = p[y == 1], p[y == 0]
    psi = (x[:, None] > z[None, :]).astype(float) + 0.5 * (x[:, None] == z[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    auc = v10.mean()
    var = v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(z)
    return auc, var


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, CLIP, 1 - CLIP)
    return np.log(q / (1 - q))


def check_against_references(report: dict, y: np.ndarray, p: np.ndarray, thresholds: dict[str, float]) -> None:
    z = norm.ppf(0.975)
    assert report["n"] == len(y) and report["positives"] == int(y.sum())
    # discrimination
    auc, var = delong_reference(y, p)
    assert abs(report["auroc"]["value"] - skm.roc_auc_score(y, p)) < EXACT
    assert abs(report["auroc"]["value"] - auc) < EXACT
    assert report["auroc"]["ci_method"] == "delong"
    assert abs(report["auroc"]["ci_lower"] - max(0.0, auc - z * math.sqrt(var))) < EXACT
    assert abs(report["auroc"]["ci_upper"] - min(1.0, auc + z * math.sqrt(var))) < EXACT
    assert abs(report["auprc"]["value"] - skm.average_precision_score(y, p)) < EXACT
    assert abs(report["brier"]["value"] - skm.brier_score_loss(y, p)) < EXACT
    # calibration: statsmodels' maximum-likelihood fits
    lp = logit(p)
    slope_fit = sm.Logit(y, sm.add_constant(lp)).fit(method="newton", disp=0, tol=1e-12, maxiter=200)
    ci = slope_fit.conf_int(alpha=0.05)
    s = report["calibration_slope"]
    assert abs(s["value"] - slope_fit.params[1]) < FIT, (s, slope_fit.params)
    assert abs(s["ci_lower"] - ci[1][0]) < FIT and abs(s["ci_upper"] - ci[1][1]) < FIT
    glm = sm.GLM(y, np.ones((len(y), 1)), family=sm.families.Binomial(), offset=lp).fit(tol=1e-12)
    i = report["calibration_intercept"]
    assert abs(i["value"] - glm.params[0]) < FIT, (i, glm.params)
    gci = glm.conf_int(alpha=0.05)
    assert abs(i["ci_lower"] - gci[0][0]) < FIT and abs(i["ci_upper"] - gci[0][1]) < FIT
    # expected calibration error over scikit-learn's uniform bins
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    # the bin counts as calibration_curve assigns them (numpy.searchsorted, side="left")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p), minlength=10)
    ece = float(np.sum(counts[counts > 0] / len(y) * np.abs(prob_true - prob_pred)))
    assert abs(report["ece"]["value"] - ece) < EXACT
    nonempty = [b for b in report["curves"]["reliability"]["bins"] if b["n"] > 0]
    assert [b["n"] for b in nonempty] == [int(c) for c in counts if c > 0]
    for b, t, q in zip(nonempty, prob_true, prob_pred):
        assert abs(b["observed"] - t) < EXACT and abs(b["mean_predicted"] - q) < EXACT
    # operating points declared in the bundle
    ops = {o["name"]: o for o in report["operating_points"]}
    for name, thr in thresholds.items():
        o = ops[name]
        pred = (p >= thr).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert o["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
        for key, (k, n) in {
            "sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
            "ppv": (tp, tp + fp), "npv": (tn, tn + fn), "accuracy": (tp + tn, len(y)),
        }.items():
            if n == 0:
                assert o[key]["value"] is None
                continue
            lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
            assert abs(o[key]["value"] - k / n) < EXACT
            assert abs(o[key]["ci_lower"] - lo) < EXACT and abs(o[key]["ci_upper"] - hi) < EXACT, (key, o[key], lo, hi)
        assert abs(o["sensitivity"]["value"] - skm.recall_score(y, pred, zero_division=0)) < EXACT
        assert abs(o["f1"]["value"] - skm.f1_score(y, pred)) < EXACT
    # thresholds chosen for a target sensitivity: the largest with tpr >= target
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    for target in (0.9, 0.95):
        want = thr[np.argmax(tpr >= target - 1e-15)]
        assert ops[f"sensitivity>={target}"]["threshold"] == pytest.approx(want, abs=0)
    # decision curve, from its definition (Vickers & Elkin 2006)
    prev = y.mean()
    for d in report["curves"]["decision"]:
        t = d["threshold"]
        treated = p >= t
        nb = (np.sum(treated & (y == 1)) - np.sum(treated & (y == 0)) * t / (1 - t)) / len(y)
        assert abs(d["net_benefit"] - nb) < EXACT
        assert abs(d["treat_all"] - (prev - (1 - prev) * t / (1 - t))) < EXACT


@pytest.mark.parametrize("name,version", _tabular())
def test_metrics_match_scikit_learn_and_statsmodels(name, version, splits, tmp_path):
    split = splits(name)
    p = _scores(name, version, split.x, split.positive)
    pred = tmp_path / "predictions.csv"
    write_predictions(pred, split.y, p, {c: split.columns[c] for c in split.subgroups})
    sub_args = [a for c in split.subgroups for a in ("--subgroup", c)]
    _, report, _ = validate("--model", f"{name}@{version}", "--predictions", str(pred),
                            *sub_args, "--bootstrap", "200", out=tmp_path / "r", expect=0)
    m = _manifest(name)
    out = next(o for o in m["outputs"] if o.get("positive_label"))
    thresholds = {t["name"]: t["value"] for t in m.get("thresholds", [])
                  if t["output"] == out["name"] and t.get("label", out["positive_label"]) == out["positive_label"]}
    check_against_references(report, split.y, p, thresholds)
    # subgroups: scikit-learn on each subset with enough rows and both classes
    for sg in report["subgroups"]:
        col = np.array(split.columns[sg["column"]])
        value = "" if sg["value"] == "(missing)" else sg["value"]
        mask = col == value
        assert sg["n"] == int(mask.sum())
        ys, ps = split.y[mask], p[mask]
        if sg["n"] >= 30 and 0 < ys.sum() < len(ys):
            assert sg["status"] == "ok"
            assert abs(sg["metrics"]["auroc"]["value"] - skm.roc_auc_score(ys, ps)) < EXACT
            assert abs(sg["metrics"]["brier"]["value"] - skm.brier_score_loss(ys, ps)) < EXACT
        else:
            assert sg["status"] == "insufficient" and "metrics" not in sg, sg
    assert report["source"] == "predictions"
    assert report["model"]["name"] == name and report["model"]["version"] == version


@pytest.mark.parametrize("name,version", _tabular())
def test_served_path_scores_like_onnxruntime_and_audits_every_row(name, version, splits, tmp_path):
    split = splits(name)
    p = _scores(name, version, split.x, split.positive)
    out = tmp_path / "r"
    _, report, _ = validate("--model", f"{name}@{version}", "--dataset", str(split.path),
                            "--backend", BACKEND, "--bootstrap", "100", out=out, expect=0)
    assert report["source"] == "inference"
    model = report["model"]
    assert model["backend"] == BACKEND and model["version"] == version
    assert model["model_sha256"] == _manifest(name)["versions"][str(version)]["files"]["model.onnx"]
    import hashlib
    assert model["manifest_sha256"] == hashlib.sha256((BUNDLES / name / "bundle.toml").read_bytes()).hexdigest()
    assert report["dataset"]["sha256"] == hashlib.sha256(split.path.read_bytes()).hexdigest()
    assert report["dataset"]["rows_used"] == len(split.y) and report["dataset"]["rows_unusable"] == 0
    assert abs(report["auroc"]["value"] - skm.roc_auc_score(split.y, p)) < 1e-4
    assert abs(report["brier"]["value"] - skm.brier_score_loss(split.y, p)) < 1e-5
    # every prediction audited: model, version, input hash; the chain verifies
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    inference = [r for r in records if r["kind"] == "inference"]
    assert sum(r["rows"] for r in inference) == len(split.y)
    assert all(r["model"] == name and r["version"] == str(version) and r["input_sha256"]
               and r["outcome"] == "ok" for r in inference)
    verify = subprocess.run([str(BIN), "audit", "verify", str(out / "audit.jsonl")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_bootstrap_is_reproducible_and_seeded(splits, tmp_path):
    split = splits("wdbc-malignancy")
    p = _scores("wdbc-malignancy", 1, split.x, split.positive)
    pred = tmp_path / "p.csv"
    write_predictions(pred, split.y, p)
    runs = []
    for k, seed in enumerate(("7", "7", "8")):
        _, r, _ = validate("--predictions", str(pred), "--bootstrap", "500", "--seed", seed,
                           out=tmp_path / f"r{k}")
        runs.append(r)
    assert runs[0]["auroc"]["bootstrap"] == runs[1]["auroc"]["bootstrap"]
    assert runs[0]["auprc"]["ci_lower"] == runs[1]["auprc"]["ci_lower"]
    assert runs[0]["auroc"]["bootstrap"] != runs[2]["auroc"]["bootstrap"]
    b = runs[0]["auroc"]["bootstrap"]
    assert b["replicates"] + b["replicates_skipped"] == 500
    assert b["ci_lower"] <= runs[0]["auroc"]["value"] <= b["ci_upper"]
    assert len(runs[0]["curves"]["roc_band"]) == 51


def test_cluster_bootstrap_by_patient(tmp_path):
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(60), 3)
    y = (rng.random(60) < 0.4).astype(int)[patients]
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, len(y)), 0, 1)
    pred = tmp_path / "p.csv"
    write_predictions(pred, y, p, {"patient": [f"P{i}" for i in patients]})
    _, r, _ = validate("--predictions", str(pred), "--patient-id-column", "patient",
                       "--bootstrap", "300", out=tmp_path / "r")
    assert r["dataset"]["clusters"] == 60
    assert abs(r["auroc"]["value"] - skm.roc_auc_score(y, p)) < EXACT


def test_ece_of_rounded_scores_equals_scikit_learn(tmp_path):
    """Scores on the bins' edges (rounded to tenths, as risk tools often give them) go to the
    bin calibration_curve puts them in (a red-team finding: the upper one, ECE 0.24 where
    scikit-learn's binning gives 0.04)."""
    rng = np.random.default_rng(11)
    p = np.round(rng.uniform(0, 1, 400), 1)
    y = (rng.uniform(0, 1, 400) < p).astype(int)
    pred = tmp_path / "p.csv"
    write_predictions(pred, y, p)
    _, r, _ = validate("--predictions", str(pred), "--bootstrap", "0", out=tmp_path / "r")
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p), minlength=10)
    ece = float(np.sum(counts[counts > 0] / len(y) * np.abs(prob_true - prob_pred)))
    assert abs(r["ece"]["value"] - ece) < EXACT, (r["ece"], ece)
    nonempty = [b for b in r["curves"]["reliability"]["bins"] if b["n"] > 0]
    assert [b["n"] for b in nonempty] == [int(c) for c in counts if c > 0]


def test_calibration_where_the_slope_has_no_maximum_or_the_scores_are_0_and_1(tmp_path):
    """Red-team findings. Scores that separate the classes (AUROC 1): the slope has no
    maximum, but calibration-in-the-large does, and it is statsmodels' offset GLM (it was
    reported undefined with the slope). Hard 0/1 scores whose classes overlap: statsmodels'
    Logit converges, and so must the slope (it was "did not converge")."""
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(50), np.zeros(150)].astype(int)
    p = np.r_[rng.uniform(0.55, 0.99, 50), rng.uniform(0.01, 0.5, 150)].round(4)
    pred = tmp_path / "sep.csv"
    write_predictions(pred, y, p)
    _, r, _ = validate("--predictions", str(pred), "--bootstrap", "0", out=tmp_path / "sep")
    assert r["calibration_slope"]["value"] is None and "separate" in r["calibration_slope"]["undefined"]
    lp = logit(p)
    glm = sm.GLM(y, np.ones((len(y), 1)), family=sm.families.Binomial(), offset=lp).fit(tol=1e-12)
    i = r["calibration_intercept"]
    assert abs(i["value"] - glm.params[0]) < FIT, (i, glm.params)
    gci = glm.conf_int(alpha=0.05)
    assert abs(i["ci_lower"] - gci[0][0]) < FIT and abs(i["ci_upper"] - gci[0][1]) < FIT

    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    pred = tmp_path / "hard.csv"
    write_predictions(pred, y, p)
    _, r, _ = validate("--predictions", str(pred), "--bootstrap", "0", out=tmp_path / "hard")
    lp = logit(p)
    fit = sm.Logit(y, sm.add_constant(lp)).fit(method="newton", disp=0, tol=1e-12, maxiter=200)
    s = r["calibration_slope"]
    assert s["value"] is not None, s
    assert abs(s["value"] - fit.params[1]) < FIT, (s, fit.params)


@pytest.mark.parametrize("cell,why", [("nan", "is NaN"), ("inf", "is infinite"), ("-inf", "is infinite"),
                                       ("1.5", "outside [0, 1]"), ("-0.1", "outside [0, 1]"), ("x", "not a number")])
def test_hostile_predictions_are_refused_with_the_row(cell, why, tmp_path):
    pred = tmp_path / "p.csv"
    pred.write_text("label,score\n1,0.9\n0,0.2\n1," + cell + "\n0,0.1\n")
    code, report, text = validate("--predictions", str(pred), out=tmp_path / "r", expect=2)
    assert "row 3" in text and why in text, text
    assert report is None


def test_edge_cases_are_reported_not_nan(tmp_path):
    # one class only
    pred = tmp_path / "one.csv"
    write_predictions(pred, [1, 1, 1, 1], [0.2, 0.4, 0.6, 0.8])
    _, r, _ = validate("--predictions", str(pred), "--bootstrap", "50", out=tmp_path / "one")
    assert r["auroc"]["value"] is None and "class" in r["auroc"]["undefined"]
    assert r["calibration_slope"]["value"] is None
    assert r["brier"]["value"] == pytest.approx(skm.brier_score_loss([1, 1, 1, 1], [0.2, 0.4, 0.6, 0.8]), abs=EXACT)
    # ties and all-equal scores
    pred = tmp_path / "equal.csv"
    y = [1, 0, 1, 0, 0, 1]
    write_predictions(pred, y, [0.5] * 6)
    _, r, _ = validate("--predictions", str(pred), "--bootstrap", "50", out=tmp_path / "equal")
    assert r["auroc"]["value"] == 0.5 and r["auprc"]["value"] == pytest.approx(0.5, abs=EXACT)
    assert r["calibration_slope"]["value"] is None and r["calibration_slope"]["undefined"]
    text = json.dumps(r)
    assert "NaN" not in text and "Infinity" not in text
    # an empty subgroup cell and a subgroup below the minimum n
    pred = tmp_path / "sub.csv"
    rng = np.random.default_rng(1)
    yy = (rng.random(80) < 0.5).astype(int)
    pp = np.clip(0.5 * yy + rng.random(80) * 0.5, 0, 1)
    site = ["A"] * 70 + ["B"] * 5 + [""] * 5
    write_predictions(pred, yy, pp, {"site": site})
    _, r, _ = validate("--predictions", str(pred), "--subgroup", "site", "--bootstrap", "0", out=tmp_path / "sub")
    by = {s["value"]: s for s in r["subgroups"]}
    assert by["A"]["status"] == "ok" and by["A"]["n"] == 70
    assert by["B"]["status"] == "insufficient" and "fewer than the minimum of 30" in by["B"]["reason"]
    assert by["(missing)"]["n"] == 5


def test_unusable_rows_are_counted_and_listed(splits, tmp_path):
    split = splits("wdbc-malignancy")
    rows = list(csv.reader(split.path.read_text().splitlines()))
    header, body = rows[0], rows[1:]
    body[4][0] = ""            # missing feature
    body[9][3] = "n/a"         # not a number
    body[20][header.index("label")] = "2"   # outside the classes
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows([header, *body, ["1", "2"]])  # a short row
    _, r, _ = validate("--model", "wdbc-malignancy@1", "--dataset", str(bad), "--bootstrap", "0",
                       "--backend", BACKEND, out=tmp_path / "r", expect=None)
    d = r["dataset"]
    assert d["rows_read"] == len(body) + 1 and d["rows_unusable"] == 4
    assert d["rows_used"] == len(body) - 3
    reasons = {u["row"]: u["reason"] for u in d["unusable"]}
    assert reasons[5] == 'feature "mean radius" is empty'
    assert reasons[10] == 'feature "mean area" is not a number'
    assert reasons[21].startswith('label "2" is not 0, 1 or one of')
    assert "fields where the header has" in reasons[len(body) + 1]
    assert "expected_p_malignant" in d["columns_ignored"]


def test_missing_columns_and_unknown_models_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("mean radius,label\n1,1\n")
    code, _, text = validate("--model", "wdbc-malignancy", "--dataset", str(bad), out=tmp_path / "a", expect=2)
    assert "missing column" in text and '"mean texture"' in text
    code, _, text = validate("--model", "no-such-model", "--dataset", str(bad), out=tmp_path / "b", expect=2)
    code, _, text = validate("--model", "wdbc-malignancy@0", "--dataset", str(bad), out=tmp_path / "c", expect=2)
    assert "positive integer" in text


def test_a_run_that_fails_leaves_no_earlier_report_in_its_folder(tmp_path):
    """The --out folder says what its last run found: a run that fails on its dataset
    removes the earlier run's report (a pipeline reading report.json took the earlier pass
    for the failed run's: red-team finding)."""
    good = BUNDLES / "wdbc-malignancy" / "testdata" / "test.csv"
    out = tmp_path / "out"
    _, report, _ = validate("--model", "wdbc-malignancy", "--dataset", str(good), "--bootstrap", "0",
                            out=out)
    assert report is not None and report["gate"]["passed"] is True
    bad = tmp_path / "bad.csv"
    bad.write_text("mean radius,label\n1,1\n")
    _, report, text = validate("--model", "wdbc-malignancy", "--dataset", str(bad), out=out, expect=2)
    assert "missing column" in text
    assert report is None
    assert not (out / "report.html").exists()


def _worse_repository(tmp: Path) -> Path:
    """A test repository holding a deliberately worse wdbc-malignancy: version 1 replaced by a
    logistic regression on four weak features fitted on 10 % of the data (never served)."""
    sys.path.insert(0, str(REPO / "models" / "train"))
    from common import export_onnx  # the same export as the shipped bundles
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    repo = tmp / "repo"
    shutil.copytree(BUNDLES / "wdbc-malignancy", repo / "wdbc-malignancy",
                    ignore=shutil.ignore_patterns("testdata", "*.minisig"))
    ds = load_breast_cancer()
    weak = [list(ds.feature_names).index(f) for f in
            ("mean fractal dimension", "texture error", "smoothness error", "symmetry error")]
    rng = np.random.default_rng(11)
    few = rng.choice(len(ds.target), size=len(ds.target) // 10, replace=False)
    small = LogisticRegression(max_iter=1000).fit(ds.data[few][:, weak], ds.target[few])
    # a 30-feature estimator to carry the weak coefficients (its own fit is discarded)
    full = LogisticRegression(max_iter=1000).fit(ds.data[few] / ds.data.max(axis=0), ds.target[few])
    full.coef_ = np.zeros_like(full.coef_)
    full.coef_[0, weak] = small.coef_[0]
    full.intercept_ = small.intercept_.copy()
    onnx_path = repo / "wdbc-malignancy" / "1" / "model.onnx"
    export_onnx(full, "weak", 30, "deliberately worse test model", onnx_path)
    import hashlib
    text = (repo / "wdbc-malignancy" / "bundle.toml").read_text()
    m = tomllib.loads(text)
    old = m["versions"]["1"]["files"]["model.onnx"]
    text = text.replace(old, hashlib.sha256(onnx_path.read_bytes()).hexdigest())
    # no self-test: its reference outputs are the shipped model's
    start = text.index("[selftest]")
    end = text.index("[versions.1]")
    text = text[:start] + text[end:]
    (repo / "wdbc-malignancy" / "bundle.toml").write_text(text)
    return repo


def test_gate_fails_a_worse_version_and_passes_the_shipped_ones(splits, tmp_path):
    split = splits("wdbc-malignancy")
    assert _manifest("wdbc-malignancy").get("validation", {}).get("gate"), "wdbc declares no gate"
    repo = _worse_repository(tmp_path)
    code, report, text = validate("--repository", str(repo), "--model", "wdbc-malignancy@1",
                                  "--dataset", str(split.path), "--bootstrap", "200",
                                  "--backend", BACKEND, out=tmp_path / "worse", expect=1)
    failed = [c for c in report["gate"]["criteria"] if not c["passed"]]
    assert failed and report["gate"]["passed"] is False
    for name, version in _tabular():
        if not _manifest(name).get("validation", {}).get("gate"):
            continue
        s = splits(name)
        code, report, text = validate("--model", f"{name}@{version}", "--dataset", str(s.path),
                                      "--backend", BACKEND, out=tmp_path / f"{name}-{version}", expect=0)
        assert report["gate"]["passed"] is True, report["gate"]


def test_the_gate_does_not_pass_on_a_handful_of_perfectly_ranked_rows(tmp_path):
    """Four rows ranked perfectly: AUROC 1, DeLong's variance 0. The gate fails on the
    minimum number of rows of each class, and the AUROC has no interval (not [1, 1])."""
    pred = tmp_path / "tiny.csv"
    write_predictions(pred, [1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2])
    _, report, _ = validate("--model", "wdbc-malignancy", "--predictions", str(pred),
                            out=tmp_path / "tiny", expect=1)
    assert report["gate"]["passed"] is False
    failed = {c["criterion"] for c in report["gate"]["criteria"] if not c["passed"]}
    assert {"min_positives", "min_negatives", "auroc.ci_lower"} <= failed, report["gate"]
    assert report["auroc"]["value"] == 1.0
    assert report["auroc"].get("ci_lower") is None and report["auroc"].get("ci_undefined")


def test_compare_two_versions_paired_delong(splits, tmp_path):
    split = splits("wdbc-malignancy")
    _, r, _ = validate("--compare", "wdbc-malignancy@1,wdbc-malignancy@2", "--dataset", str(split.path),
                       "--backend", BACKEND, "--bootstrap", "100", out=tmp_path / "c", expect=None)
    c = r["comparison"]
    assert c["a"] == "wdbc-malignancy@1" and c["b"] == "wdbc-malignancy@2"
    p1 = _scores("wdbc-malignancy", 1, split.x, split.positive)
    p2 = _scores("wdbc-malignancy", 2, split.x, split.positive)
    y = split.y
    # paired DeLong from the O(m·n) components
    def comps(p):
        x, z = p[y == 1], p[y == 0]
        psi = (x[:, None] > z[None, :]).astype(float) + 0.5 * (x[:, None] == z[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)
    a10, a01 = comps(p1)
    b10, b01 = comps(p2)
    m, n = len(a10), len(a01)
    var = (np.var(a10, ddof=1) + np.var(b10, ddof=1) - 2 * np.cov(a10, b10)[0, 1]) / m \
        + (np.var(a01, ddof=1) + np.var(b01, ddof=1) - 2 * np.cov(a01, b01)[0, 1]) / n
    diff = b10.mean() - a10.mean()
    d = c["auroc_difference"]
    assert abs(d["difference"] - diff) < 1e-4
    assert abs(d["standard_error"] - math.sqrt(var)) < 1e-4
    assert 0 <= d["p_value"] <= 1


def test_html_report_renders_in_headless_chromium(splits, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    assert chromium, "chromium is not installed (scripts/test.sh installs Debian's chromium)"
    split = splits("pima-diabetes")
    out = tmp_path / "r"
    validate("--model", "pima-diabetes", "--dataset", str(split.path), "--backend", BACKEND,
             "--subgroup", ",".join(split.subgroups), "--bootstrap", "200", out=out, expect=0)
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("<svg") >= 5, "ROC, PR, calibration, decision curve and forest plot"
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"report-{BACKEND}.png"
    shot.unlink(missing_ok=True)
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--window-size=1100,4000", f"--screenshot={shot}", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    console = [l for l in proc.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l]
    assert not console, console
    shutil.copy(out / "report.html", ARTIFACTS / f"report-{BACKEND}.html")


def test_multiclass_tensor_split_matches_scikit_learn(orientation_testdata, tmp_path):
    """The 8-way `orientation` output on the image bundle's test split: one-vs-rest and macro
    metrics against scikit-learn on onnxruntime's probabilities of the same tensors."""
    image_split = orientation_testdata
    x = np.load(image_split / "images.npy")
    y = np.load(image_split / "labels.npy")
    labels, prob = _orientation_probabilities(x)
    out = tmp_path / "r"
    _, r, text = validate("--model", "image-orientation", "--output", "orientation", "--dataset", str(image_split),
                          "--backend", BACKEND, "--bootstrap", "200", out=out, expect=0)
    assert r["task"] == "multiclass" and r["labels"] == labels
    assert r["dataset"]["kind"] == "npy-tensors" and r["dataset"]["rows_used"] == len(y)
    import hashlib
    files = r["dataset"]["files"]
    assert files["images.npy"] == hashlib.sha256((image_split / "images.npy").read_bytes()).hexdigest()
    # the engine's probabilities differ from onnxruntime's by < 1e-5: ranks and argmax agree
    # except at near-ties, so compare within one row's worth
    n = len(y)
    assert abs(r["auroc"]["value"] - skm.roc_auc_score(y, prob, multi_class="ovr", average="macro")) < 1e-3
    assert r["auroc"]["ci_method"] == "bootstrap-percentile"
    assert r["auroc"]["ci_lower"] <= r["auroc"]["value"] <= r["auroc"]["ci_upper"]
    onehot = np.eye(len(labels))[y]
    assert abs(r["auprc"]["value"] - skm.average_precision_score(onehot, prob, average="macro")) < 1e-3
    pred = prob.argmax(axis=1)
    assert abs(r["accuracy"]["value"] - skm.accuracy_score(y, pred)) <= 1 / n + 1e-12
    present = np.unique(y)
    assert abs(r["macro_sensitivity"]["value"] - skm.recall_score(y, pred, labels=present, average="macro")) <= 1 / n
    assert abs(r["macro_f1"]["value"] - skm.f1_score(y, pred, labels=present, average="macro")) <= 2 / n
    assert abs(r["brier"]["value"] - np.mean(np.sum((prob - onehot) ** 2, axis=1))) < 1e-4
    cm = skm.confusion_matrix(y, pred, labels=list(range(len(labels))))
    assert np.abs(np.array(r["confusion"]) - cm).sum() <= 2, (r["confusion"], cm.tolist())
    for k, c in enumerate(r["classes"]):
        assert c["label"] == labels[k] and c["n"] == int((y == k).sum())
        assert abs(c["auroc"]["value"] - skm.roc_auc_score(y == k, prob[:, k])) < 1e-3
    html = (out / "report.html").read_text()
    assert "Confusion matrix" in html and "macro AUROC" in html
    # A tensor dataset has no columns: a patient-id column named for it was taken and
    # ignored (a report of 0 patients: a red-team finding); refused.
    _, _, text = validate("--model", "image-orientation", "--output", "orientation", "--dataset",
                          str(image_split), "--patient-id-column", "pid", out=tmp_path / "pid", expect=2)
    assert "has no columns for --patient-id-column" in text, text


def test_multiclass_npy_labels_outside_the_classes_are_listed(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    rng = np.random.default_rng(5)
    np.save(folder / "images.npy", rng.random((6, 1, 224, 224), dtype=np.float32))
    np.save(folder / "labels.npy", np.array([0, 1, 9, 3, -1, 7], dtype=np.int64))
    _, r, _ = validate("--model", "image-orientation", "--output", "orientation", "--dataset", str(folder),
                       "--backend", BACKEND, "--bootstrap", "0", out=tmp_path / "r", expect=0)
    reasons = {u["row"]: u["reason"] for u in r["dataset"]["unusable"]}
    assert set(reasons) == {3, 5} and "below 8" in reasons[3]
    # a wrong row shape is refused before anything runs
    np.save(folder / "images.npy", np.zeros((6, 1, 32, 32), dtype=np.float32))
    _, _, text = validate("--model", "image-orientation", "--output", "orientation", "--dataset", str(folder),
                          out=tmp_path / "s", expect=2)
    assert "do not fit the model input" in text


def _dicom_dataset(folder: Path) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Real CT and MR images from pydicom's test files in the 8 orientations (written as new
    uncompressed DICOM files with pydicom), a manifest.csv (file, label, source), a truncated
    file and a path leaving the folder. Returns the numpy-preprocessed inputs, labels and
    sources of the usable rows, in manifest order."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    sys.path.insert(0, str(REPO / "models" / "train"))
    import imaging  # the numpy reference of the image bundles' preprocessing

    spec = imaging.Preprocessing(height=224, width=224, window="percentile", low=0.5, high=99.5,
                                 aspect="pad", pad_value=0.0, mean=0.5, std=0.25)
    folder.mkdir(parents=True, exist_ok=True)
    rows, inputs, labels, sources = [], [], [], []
    for source in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(source))
        pixels = ds.pixel_array
        for k in range(8):
            out = ds.copy()
            img = imaging.d4(pixels, k)
            out.Rows, out.Columns = img.shape
            out.PixelData = img.astype(pixels.dtype).tobytes()
            out.SOPInstanceUID = generate_uid()
            out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
            out.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            name = f"{source[:2].lower()}/{k}.dcm"
            (folder / name).parent.mkdir(exist_ok=True)
            out.save_as(folder / name, enforce_file_format=True)
            rows.append((name, k, source))
            back = pydicom.dcmread(folder / name)
            inputs.append(imaging.preprocess(
                back.pixel_array, spec,
                slope=float(getattr(back, "RescaleSlope", 1.0)),
                intercept=float(getattr(back, "RescaleIntercept", 0.0)),
                monochrome1=back.PhotometricInterpretation == "MONOCHROME1"))
            labels.append(k)
            sources.append(source)
    (folder / "broken.dcm").write_bytes((folder / rows[0][0]).read_bytes()[:700])
    # A 10-frame MR (its frames are one image's, not ten rows) and a US colour image (the
    # bundle's [dicom] section takes CR/DX/CT/MR in MONOCHROME1/2 only): unusable rows, as
    # the pipeline would never send them to the bundle (a review's findings).
    shutil.copy(get_testdata_file("emri_small.dcm"), folder / "multi.dcm")
    shutil.copy(get_testdata_file("US1_UNCR.dcm"), folder / "us.dcm")
    # An image named again counts once, whatever the name (a review's finding: six files named
    # twenty times each passed a gate the six alone fail); a FIFO is refused without blocking.
    shutil.copy(folder / rows[1][0], folder / "copy.dcm")
    os.symlink(rows[2][0], folder / "link.dcm")
    os.mkfifo(folder / "fifo.dcm")
    # The same instance re-encoded (Implicit VR): one image too, by its SOP Instance UID.
    again = pydicom.dcmread(folder / rows[3][0])
    again.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    again.save_as(folder / "reencoded.dcm", enforce_file_format=True)
    # The same image under a new SOP Instance UID: one image still, by its preprocessed pixels
    # and label; a file without a SOP Instance UID is no instance; a link that leads nowhere
    # (a loop) is not "missing" (a review's findings).
    anew = pydicom.dcmread(folder / rows[5][0])
    anew.SOPInstanceUID = generate_uid()
    anew.file_meta.MediaStorageSOPInstanceUID = anew.SOPInstanceUID
    anew.save_as(folder / "anew.dcm", enforce_file_format=True)
    nouid = pydicom.dcmread(folder / rows[6][0])
    nouid.PatientComments = "another copy"
    del nouid.SOPInstanceUID
    nouid.save_as(folder / "nouid.dcm", enforce_file_format=True)
    os.symlink("loop2.dcm", folder / "loop1.dcm")
    os.symlink("loop1.dcm", folder / "loop2.dcm")
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "source"])
        w.writerows(rows)
        w.writerow(["broken.dcm", 0, "x"])
        w.writerow(["../outside.dcm", 1, "x"])
        w.writerow(["multi.dcm", 0, "x"])
        w.writerow(["us.dcm", 1, "x"])
        w.writerow([rows[0][0], 0, "x"])
        w.writerow(["copy.dcm", 1, "x"])
        w.writerow(["link.dcm", 2, "x"])
        w.writerow(["fifo.dcm", 0, "x"])
        w.writerow(["reencoded.dcm", 3, "x"])
        w.writerow(["anew.dcm", 5, "x"])
        w.writerow(["nouid.dcm", 6, "x"])
        w.writerow(["loop1.dcm", 7, "x"])
    return inputs, labels, sources


def test_a_dicom_folder_is_decoded_and_preprocessed_as_the_pipeline_does(tmp_path):
    """A folder of DICOM files with a manifest: decoded and preprocessed as the imaging
    pipeline does, the 8-way output against scikit-learn on onnxruntime's probabilities of
    the numpy-preprocessed images; unreadable files and paths out of the folder are listed."""
    folder = tmp_path / "dicom"
    inputs, y, _ = _dicom_dataset(folder)
    _, prob = _orientation_probabilities(np.stack(inputs))
    y = np.array(y)
    _, r, text = validate("--model", "image-orientation", "--output", "orientation", "--dataset", str(folder),
                          "--backend", BACKEND, "--bootstrap", "100", out=tmp_path / "r", expect=0)
    d = r["dataset"]
    assert d["kind"] == "dicom-folder" and d["rows_used"] == len(y), d
    reasons = {u["row"]: u["reason"] for u in d["unusable"]}
    assert set(reasons) == set(range(len(y) + 1, len(y) + 13)), reasons
    assert "outside the dataset folder" in reasons[len(y) + 2]
    assert reasons[len(y) + 5] == "the same file as row 1: an image counts once", reasons
    assert reasons[len(y) + 6] == "the same bytes as the file of row 2: an image counts once", reasons
    assert reasons[len(y) + 7] == "the same file as row 3: an image counts once", reasons
    assert reasons[len(y) + 8].startswith("not a regular file"), reasons
    assert reasons[len(y) + 9] == "the same instance (SOP Instance UID) as row 4: an image counts once", reasons
    assert reasons[len(y) + 10] == "the same image (after preprocessing) and label as row 6: a row counts once", reasons
    assert reasons[len(y) + 11].startswith("no SOP Instance UID"), reasons
    assert reasons[len(y) + 12] == "the file is outside the dataset folder, or a link leads to it", reasons
    assert reasons[len(y) + 3].startswith("10 frames: a row of a DICOM dataset is one single-frame image"), reasons
    assert "does not take it (modality \"US\" not accepted)" in reasons[len(y) + 4], reasons
    assert abs(r["auroc"]["value"] - skm.roc_auc_score(y, prob, multi_class="ovr", average="macro")) < 1e-3
    pred = prob.argmax(axis=1)
    assert abs(r["accuracy"]["value"] - skm.accuracy_score(y, pred)) <= 1 / len(y) + 1e-12
    for k, c in enumerate(r["classes"]):
        assert abs(c["auroc"]["value"] - skm.roc_auc_score(y == k, prob[:, k])) < 1e-3
    # every file's SHA-256 is in the dataset's digest listing
    import hashlib
    assert d["files"]["manifest.csv"] == hashlib.sha256((folder / "manifest.csv").read_bytes()).hexdigest()
    assert d["files"]["ct/0.dcm"] == hashlib.sha256((folder / "ct/0.dcm").read_bytes()).hexdigest()


def test_multiclass_predictions_and_subgroups_match_scikit_learn_exactly(orientation_testdata, tmp_path):
    """Multi-class metrics on a predictions file (onnxruntime's probabilities of the image
    split, the same numbers on both sides): to 1e-9 against scikit-learn, per subgroup too."""
    x = np.load(orientation_testdata / "images.npy")
    y = np.load(orientation_testdata / "labels.npy")
    samples = json.loads((orientation_testdata / "samples.json").read_text())
    rows = samples["samples"] if isinstance(samples, dict) else samples
    source = [str(s["source"]) for s in rows]
    labels, prob = _orientation_probabilities(x)
    pred_csv = tmp_path / "pred.csv"
    with open(pred_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "source", *[f"score_{l}" for l in labels]])
        for i in range(len(y)):
            w.writerow([labels[y[i]], source[i], *[repr(float(v)) for v in prob[i]]])
    _, r, _ = validate("--model", "image-orientation", "--output", "orientation", "--predictions", str(pred_csv),
                       "--subgroup", "source", "--bootstrap", "0", out=tmp_path / "r", expect=0)

    def check(rep, yy, pp):
        present = np.unique(yy)
        pred = pp.argmax(axis=1)
        onehot = np.eye(len(labels))[yy]
        assert abs(rep["auroc"]["value"] - skm.roc_auc_score(yy, pp, multi_class="ovr", average="macro")) < EXACT
        assert abs(rep["auprc"]["value"] - skm.average_precision_score(onehot[:, present], pp[:, present],
                                                                       average="macro")) < EXACT
        assert abs(rep["accuracy"]["value"] - skm.accuracy_score(yy, pred)) < EXACT
        assert abs(rep["macro_sensitivity"]["value"] - skm.recall_score(yy, pred, labels=present,
                                                                        average="macro")) < EXACT
        assert abs(rep["macro_f1"]["value"] - skm.f1_score(yy, pred, labels=present, average="macro")) < EXACT
        assert abs(rep["brier"]["value"] - np.mean(np.sum((pp - onehot) ** 2, axis=1))) < EXACT
        assert rep["confusion"] == skm.confusion_matrix(yy, pred, labels=list(range(len(labels)))).tolist()

    check(r, y, prob)
    # A row whose class probabilities are not one distribution (every class 1.0, summing to
    # 8: the report's Brier was 7) is refused naming its row, as a score outside [0, 1] is;
    # rounding to 4 decimals is not.
    lines = pred_csv.read_text().splitlines()
    cells = lines[3].split(",")
    bad_csv = tmp_path / "not_a_distribution.csv"
    bad_csv.write_text("\n".join([*lines[:3], ",".join(cells[:2] + ["1.0"] * len(labels)), *lines[4:]]) + "\n")
    _, _, text = validate("--model", "image-orientation", "--output", "orientation", "--predictions",
                          str(bad_csv), "--bootstrap", "0", out=tmp_path / "bad", expect=2)
    assert "row 3: the class probabilities sum to 8" in text, text
    rounded_csv = tmp_path / "rounded.csv"
    with open(rounded_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "source", *[f"score_{l}" for l in labels]])
        for i in range(len(y)):
            w.writerow([labels[y[i]], source[i], *[f"{v:.4f}" for v in prob[i]]])
    validate("--model", "image-orientation", "--output", "orientation", "--predictions", str(rounded_csv),
             "--bootstrap", "0", out=tmp_path / "rounded", expect=0)
    assert r["subgroups"], "one subgroup per held-out source image"
    for sg in r["subgroups"]:
        mask = np.array(source) == sg["value"]
        assert sg["n"] == int(mask.sum())
        if sg["status"] == "ok":
            check(sg["multiclass"], y[mask], prob[mask])
        else:
            assert sg["n"] < 30 or len(np.unique(y[mask])) < 2, sg
    _check_multiclass_clustered_by_source(pred_csv, y, prob, source, tmp_path)


def _check_multiclass_clustered_by_source(pred_csv, y, prob, source, tmp_path):
    """Rows clustered by patient (each held-out source image's crops and transforms are one
    "patient"): the macro AUROC's interval resamples whole sources, the patients of each class
    are counted, and no interval that takes rows as independent is reported (it was refused:
    with rows counted, a gate passed on three patients' rows). With so few sources, every
    ordered draw of them can be enumerated: the interval's limits are checked against that
    exact bootstrap distribution (scikit-learn's weighted one-vs-rest AUROCs)."""
    _, r, _ = validate("--model", "image-orientation", "--output", "orientation", "--predictions",
                       str(pred_csv), "--patient-id-column", "source", "--bootstrap", "2000",
                       out=tmp_path / "clustered", expect=None)
    sources = sorted(set(source))
    assert r["dataset"]["clusters"] == len(sources)
    assert r["patients"] == len(sources)
    src = np.array(source)
    for k, c in enumerate(r["classes"]):
        with_class = {s for s in sources if np.any((src == s) & (y == k))}
        outside = {s for s in sources if np.any((src == s) & (y != k))}
        assert c["patients"] == len(with_class) and c["patients_outside"] == len(outside), c
        for m in ("auroc", "sensitivity", "ppv"):
            assert c[m].get("ci_lower") is None, (k, m, c[m])
    acc = r["accuracy"]
    assert acc.get("ci_lower") is None and "clustered by patient" in acc["ci_undefined"], acc
    # The exact cluster bootstrap: every ordered draw of len(sources) sources, equally likely.
    import itertools
    present = np.unique(y)
    macro = []
    for draw in itertools.product(range(len(sources)), repeat=len(sources)):
        w = np.zeros(len(y))
        for d in draw:
            w += src == sources[d]
        aucs = [skm.roc_auc_score(y == k, prob[:, k], sample_weight=w) for k in present
                if 0 < w[y == k].sum() < w.sum()]
        macro.append(np.mean(aucs))
    macro = np.array(macro)
    a = r["auroc"]
    assert a["ci_method"] == "bootstrap-percentile", a
    lo, hi = a["ci_lower"], a["ci_upper"]
    assert np.mean(macro < lo - 1e-12) <= 0.06 and np.mean(macro <= lo + 1e-12) >= 0.005, (lo, np.sort(macro))
    assert np.mean(macro > hi + 1e-12) <= 0.06 and np.mean(macro >= hi - 1e-12) >= 0.005, (hi, np.sort(macro))


def _orientation_probabilities(x: np.ndarray) -> tuple[list[str], np.ndarray]:
    """onnxruntime's 8-way `orientation` probabilities of preprocessed images, and the labels."""
    m = _manifest("image-orientation")
    labels = next(o for o in m["outputs"] if o["name"] == "orientation")["labels"]
    sess = ort.InferenceSession(str(BUNDLES / "image-orientation" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    (prob,) = sess.run(["orientation"], {m["inputs"][0]["name"]: x.astype(np.float32)})
    return labels, prob.astype(np.float64)


def test_a_server_stopped_during_a_run_exits_and_leaves_one_audit_chain(tmp_path):
    """Red-team finding: SIGTERM during a validation run closed the port and logged "stopped"
    but the process lived on, its run still appending to the audit trail; a new server on the
    same data folder appended records of the same sequence numbers and `audit verify` failed.
    Now the run is stopped with the server and the process exits (bounded), and the next
    server's records continue the one chain."""
    import signal
    import time
    import urllib.request

    from conftest import _free_port, wait_ready

    root = tmp_path / "datasets"
    root.mkdir()
    # The test split twenty times over, with a million bootstrap resamples: minutes of work
    # (the old server lived on that long after SIGTERM; now it exits within seconds).
    lines = (REPO / "models" / "bundles" / "wdbc-malignancy" / "testdata" / "test.csv").read_text().splitlines()
    (root / "test.csv").write_text("\n".join([lines[0]] + lines[1:] * 20) + "\n")
    data = tmp_path / "data"
    import hashlib
    key = "researcher-key-for-the-shutdown-test"
    config = tmp_path / "nightingale.toml"
    config.write_text("[auth]\nanonymous_roles = [\"infer\"]\n[[auth.api_keys]]\n"
                      "name = \"r\"\nrole = \"researcher\"\n"
                      f"sha256 = \"{hashlib.sha256(key.encode()).hexdigest()}\"\n")

    def start() -> tuple[subprocess.Popen, str]:
        port = _free_port()
        addr = f"127.0.0.1:{port}"
        log = open(tmp_path / f"server-{port}.log", "wb")
        proc = subprocess.Popen([str(BIN), "serve", "--repository", str(REPO / "models" / "bundles"),
                                 "--http-addr", addr, "--data-dir", str(data),
                                 "--validation-root", str(root), "--config", str(config)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        wait_ready(proc, addr, tmp_path / f"server-{port}.log")
        return proc, addr

    def post(addr: str, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://{addr}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    proc, addr = start()
    try:
        run = post(addr, "/validation/runs",
                   {"model": "wdbc-malignancy", "dataset": "test.csv", "bootstrap": 1000000})
        # The run is going (its rows are being scored, then the long bootstrap).
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, addr = start()
    try:
        row = [14.0] * 30
        for _ in range(5):
            post(addr, "/v2/models/wdbc-malignancy/infer",
                 {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": row}]})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    verify = subprocess.run([str(BIN), "audit", "verify", str(data / "audit")], capture_output=True,
                            text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert run["id"]


def test_a_label_column_that_is_a_model_input_is_refused(splits, tmp_path):
    """A review's finding: --label-column naming one of the model's features was accepted
    (a binary feature would have been evaluated as ground truth) and the refusal of its first
    value quoted a feature value. Refused before any row is read, naming only the column."""
    split = splits("wdbc-malignancy")
    header = split.path.read_text(encoding="utf-8").splitlines()[0].split(",")
    feature = next(c for c in header if c.strip().strip('"') == "mean radius")
    code, report, text = validate("--model", "wdbc-malignancy@1", "--dataset", str(split.path),
                                  "--backend", BACKEND, "--label-column", feature.strip('"'),
                                  out=tmp_path / "r", expect=2)
    assert "is one of the model's input features" in text, text
    assert report is None
    first_value = split.path.read_text(encoding="utf-8").splitlines()[1].split(",")[header.index(feature)]
    assert first_value not in text
