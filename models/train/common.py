"""Shared parts of the bundle training scripts (models/train/*.py).

Each bundle script loads its data into a `Dataset`, describes its bundle in a
`BundleSpec` and calls `build_bundle`, which for every version:

  * trains on the fixed stratified 60/20/20 split (`stratified_split`),
  * exports to ONNX with skl2onnx (`export_onnx`) and checks the export against the
    training framework and for a working dynamic batch dimension (`check_export`),
  * chooses the operating threshold on out-of-fold predictions of the
    training+validation data (`choose_threshold`; the rules are `THRESHOLD_RULES`),
  * measures the test split once (`evaluate`, `subgroup_table`) and writes
    `<version>/metrics.json`,

then writes `bundle.toml`, `MODEL_CARD.md` and `testdata/test.csv` (or, for data
whose licence does not allow redistribution, leaves the CSV to
`--testdata-only`, which rebuilds it from the package data and the committed
model files without retraining).

Everything is deterministic for a given seed and package set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

import selftest
from signing import sign_bundle

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "models" / "bundles"

N_BOOTSTRAP = 2000
Z95 = 1.959963984540054
# Main-domain opset 17 (ONNX 1.12) is understood by onnxruntime 1.32 and tract 0.23;
# ai.onnx.ml is capped at 3 (skl2onnx only declares what it needs).
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
CV_FOLDS = 5
TARGET_SENSITIVITY = 0.95
# Per-subgroup AUROC is reported only when the subgroup has at least this many
# cases of each class; below that the estimate is too unstable to be useful.
MIN_PER_CLASS_FOR_AUROC = 5
ATOL_FRAMEWORK = 1e-5

_CV = (
    f"out-of-fold predictions for the training+validation data ({CV_FOLDS}-fold stratified "
    "cross-validation, refitting the same model recipe on each 4/5)"
)
THRESHOLD_RULES = {
    "sensitivity": (
        f"largest threshold on P({{pos}}) whose sensitivity is >= {TARGET_SENSITIVITY:.0%} on {_CV}, "
        "rounded down to 6 significant digits"
    ),
    "youden": (
        f"threshold on P({{pos}}) that maximises Youden's J (sensitivity + specificity - 1) on {_CV}; "
        "the lowest such threshold on ties; rounded down to 6 significant digits"
    ),
}
_WHY_CV = (
    "It is chosen on the training and validation splits together (80% of the data) rather than on the "
    "validation split alone: the cross-validated scores give every case of both splits a score from a "
    "model that did not see it, so the choice rests on about four times as many positives as the "
    "validation split holds and one case more or less moves the threshold far less. The test split is "
    "never used to choose it."
)
THRESHOLD_RATIONALES = {
    "sensitivity": (
        "A missed positive costs more than a false alarm here, so the operating point fixes sensitivity. "
        + _WHY_CV
    ),
    "youden": (
        "No cost ratio between a missed positive and a false alarm is attached to this demonstration "
        "model, and the model separates the classes too weakly for a fixed high-sensitivity target to "
        "leave useful specificity (see the comparison below), so the point that weighs both errors "
        "equally is used. " + _WHY_CV
    ),
}


# --- data --------------------------------------------------------------------------


@dataclass
class Feature:
    name: str
    unit: str
    description: str = ""
    code: str | None = None  # a FHIR Observation's code (SYSTEM|CODE), exclusive with `fhir`
    min: float | None = None  # filled from the training split
    max: float | None = None
    # Where the feature comes from in FHIR when not an Observation: "patient-age",
    # "patient-female", "condition" (with `conditions`) or "encounter-class" (with
    # `encounter_class`); see docs/cds-hooks.md.
    fhir: str | None = None
    conditions: list[str] | None = None
    encounter_class: list[str] | None = None
    mean: float | None = None  # filled from the training split: the attribution reference
    # `code` features (docs/cds-hooks.md): how old an Observation may be, instead of the CDS
    # service's look-back; the analyte's molar mass (g/mol) for mmol/L <-> mg/dL.
    look_back_hours: float | None = None
    molar_mass: float | None = None


@dataclass
class Dataset:
    X: np.ndarray  # float64 [n, F], columns in `features` order
    y: np.ndarray  # int64 class index into `labels` (the model's column order)
    labels: list[str]
    positive: int  # index of the positive class in `labels`
    features: list[Feature]
    # Subgroup variables for the model card and the test CSV: name -> per-row level (str).
    subgroups: dict[str, np.ndarray] = field(default_factory=dict)
    # Optional display order of each subgroup variable's levels (default: sorted).
    subgroup_order: dict[str, list[str]] = field(default_factory=dict)

    @property
    def positive_label(self) -> str:
        return self.labels[self.positive]

    @property
    def negative_label(self) -> str:
        return self.labels[1 - self.positive]

    def y_pos(self, idx: np.ndarray | None = None) -> np.ndarray:
        y = self.y if idx is None else self.y[idx]
        return (y == self.positive).astype(np.int64)


@dataclass
class Split:
    seed: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def trval(self) -> np.ndarray:
        return np.concatenate([self.train, self.val])


def stratified_split(y: np.ndarray, seed: int) -> Split:
    """Fixed stratified 60/20/20 train/validation/test split of row indices."""
    idx = np.arange(len(y))
    idx_trval, idx_test = train_test_split(idx, test_size=0.20, stratify=y, random_state=seed)
    idx_train, idx_val = train_test_split(
        idx_trval, test_size=0.25, stratify=y[idx_trval], random_state=seed
    )
    return Split(seed, idx_train, idx_val, idx_test)


# --- ONNX --------------------------------------------------------------------------


def dedupe_opsets(model: onnx.ModelProto) -> None:
    """skl2onnx 1.20 with onnx 1.23 declares the default domain twice in
    opset_import; keep one entry per domain (the highest version)."""
    best: dict[str, int] = {}
    for o in model.opset_import:
        best[o.domain] = max(best.get(o.domain, 0), o.version)
    del model.opset_import[:]
    for domain in sorted(best):
        o = model.opset_import.add()
        o.domain = domain
        o.version = best[domain]


def export_onnx(estimator, graph_name: str, n_features: int, doc: str, path: Path) -> onnx.ModelProto:
    """Export a fitted scikit-learn classifier (or a Pipeline ending in one) with input
    `features` FP32 [None, F] and outputs `label` INT64 [None], `probabilities` FP32
    [None, classes] (zipmap off), and write it to `path`."""
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    onx = convert_sklearn(
        estimator,
        name=graph_name,
        initial_types=[("features", FloatTensorType([None, n_features]))],
        options={type(final): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    dedupe_opsets(onx)
    onx.doc_string = doc
    onnx.checker.check_model(onx, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    return onx


class OrtModel:
    """onnxruntime (CPU) on a bundle model: features -> (label, probabilities)."""

    def __init__(self, path: Path):
        self.path = path
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = [o.name for o in self.sess.get_outputs()]
        assert outs == ["label", "probabilities"], outs
        ins = self.sess.get_inputs()
        assert [i.name for i in ins] == ["features"], [i.name for i in ins]

    def run(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        label, prob = self.sess.run(["label", "probabilities"], {"features": X.astype(np.float32)})
        return label, prob


def check_export(onx: onnx.ModelProto, model: OrtModel, estimator, X: np.ndarray) -> dict:
    """Compare onnxruntime with the framework on every row of X, and check that the
    batch dimension is dynamic: declared open in the graph, and batches of 1, 7 and all
    rows give the same numbers row for row."""
    _, prob_all = model.run(X)
    # The ONNX model sees float32 inputs; give the framework the same values.
    sk_prob = estimator.predict_proba(X.astype(np.float32).astype(np.float64))
    max_diff = float(np.max(np.abs(prob_all.astype(np.float64) - sk_prob)))
    print(f"  max |onnxruntime - scikit-learn predict_proba| = {max_diff:.3e} over {len(X)} rows")
    assert max_diff < ATOL_FRAMEWORK, max_diff
    label_all, _ = model.run(X)
    assert np.array_equal(label_all, np.argmax(prob_all, axis=1))

    dim0 = onx.graph.input[0].type.tensor_type.shape.dim[0]
    dynamic = not dim0.HasField("dim_value")
    assert dynamic, f"batch dimension of `features` is fixed: {dim0}"
    for out in onx.graph.output:
        d = out.type.tensor_type.shape.dim[0]
        assert not d.HasField("dim_value"), f"batch dimension of {out.name} is fixed"
    batch_diff = 0.0
    for size in (1, 7):
        for start in range(0, len(X), size):
            _, p = model.run(X[start : start + size])
            batch_diff = max(batch_diff, float(np.max(np.abs(p - prob_all[start : start + size]))))
    print(f"  dynamic batch: max |batch 1 or 7 - batch {len(X)}| = {batch_diff:.3e}")
    assert batch_diff < 1e-6, batch_diff

    op_types = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in onx.graph.node})
    opsets = {o.domain or "ai.onnx": o.version for o in onx.opset_import}
    print(f"  onnx ops: {op_types}; opsets {opsets}; ir_version {onx.ir_version}")
    return {
        "max_abs_diff_vs_framework": max_diff,
        "framework_rows_compared": int(len(X)),
        "batch_dim": dim0.dim_param or "unnamed",
        "max_abs_diff_batch_1_or_7_vs_all": batch_diff,
        "ops": op_types,
        "opsets": opsets,
        "ir_version": int(onx.ir_version),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- statistics --------------------------------------------------------------------


def wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    denom = 1 + Z95 * Z95 / n
    centre = (p + Z95 * Z95 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 * Z95 / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return [lo, hi]


def round_down_sig(x: float, digits: int = 6) -> float:
    """Largest number with `digits` significant digits that is <= x, so the
    threshold written to the manifest never drops a case the exact one kept."""
    if x <= 0:
        return 0.0
    exp = math.floor(math.log10(x)) - (digits - 1)
    q = math.floor(x / 10.0**exp)
    while True:
        v = float(f"{q}e{exp}")
        if v <= x:
            return v
        q -= 1


def binary_counts(y_pos: np.ndarray, p: np.ndarray, thr: float) -> dict[str, int]:
    pred = p >= thr
    return {
        "tp": int(np.sum(pred & (y_pos == 1))),
        "fp": int(np.sum(pred & (y_pos == 0))),
        "tn": int(np.sum(~pred & (y_pos == 0))),
        "fn": int(np.sum(~pred & (y_pos == 1))),
    }


def rate(k: int, n: int) -> dict:
    return {"value": k / n if n else None, "ci95": wilson(k, n), "k": k, "n": n}


def sens_spec(c: dict[str, int]) -> tuple[float | None, float | None]:
    npos, nneg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    return (c["tp"] / npos if npos else None, c["tn"] / nneg if nneg else None)


def bootstrap_auroc_brier(y_pos: np.ndarray, p: np.ndarray, seed: int, n_boot: int = N_BOOTSTRAP):
    """Percentile bootstrap CIs for AUROC and Brier from the same resamples (resamples
    holding one class only are redrawn)."""
    rng = np.random.default_rng(seed)
    aurocs, briers = [], []
    n = len(y_pos)
    while len(aurocs) < n_boot:
        b = rng.integers(0, n, n)
        yb = y_pos[b]
        if yb.min() == yb.max():
            continue
        aurocs.append(roc_auc_score(yb, p[b]))
        briers.append(float(np.mean((p[b] - yb) ** 2)))
    pc = lambda v: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]  # noqa: E731
    return pc(aurocs), pc(briers)


def evaluate(y_pos: np.ndarray, p: np.ndarray, threshold: float, seed: int) -> dict:
    """AUROC, Brier (bootstrap CIs) and sensitivity/specificity/PPV/NPV at the threshold
    (Wilson CIs) of scores p for a binary outcome y_pos (1 = positive)."""
    auroc = float(roc_auc_score(y_pos, p))
    auroc_ci, brier_ci = bootstrap_auroc_brier(y_pos, p, seed)
    c = binary_counts(y_pos, p, threshold)
    boot = f"percentile bootstrap, {N_BOOTSTRAP} resamples, seed {seed}"
    return {
        "auroc": {"value": auroc, "ci95": auroc_ci, "ci_method": boot},
        "at_threshold": {
            **c,
            "sensitivity": rate(c["tp"], c["tp"] + c["fn"]),
            "specificity": rate(c["tn"], c["tn"] + c["fp"]),
            "ppv": rate(c["tp"], c["tp"] + c["fp"]),
            "npv": rate(c["tn"], c["tn"] + c["fn"]),
            "ci_method": "Wilson score interval, 95%",
        },
        "brier": {"value": float(np.mean((p - y_pos) ** 2)), "ci95": brier_ci, "ci_method": boot},
    }


def subgroup_table(
    subgroups: dict[str, np.ndarray], y_pos: np.ndarray, p: np.ndarray, threshold: float, seed: int,
    order: dict[str, list[str]] | None = None,
) -> list[dict]:
    """Per-level n, positives, AUROC (bootstrap CI) where each class has at least
    MIN_PER_CLASS_FOR_AUROC cases, and sensitivity/specificity at the threshold."""
    rows = []
    for var, levels in subgroups.items():
        present = set(levels.tolist())
        wanted = (order or {}).get(var)
        ordered = [lv for lv in wanted if lv in present] if wanted else sorted(present)
        assert set(ordered) == present, (var, present, wanted)
        for level in ordered:
            m = levels == level
            yp, pp = y_pos[m], p[m]
            npos = int(yp.sum())
            nneg = int(len(yp) - npos)
            row = {"variable": var, "level": str(level), "n": int(len(yp)), "positives": npos}
            if npos >= MIN_PER_CLASS_FOR_AUROC and nneg >= MIN_PER_CLASS_FOR_AUROC:
                ci, _ = bootstrap_auroc_brier(yp, pp, seed)
                row["auroc"] = {"value": float(roc_auc_score(yp, pp)), "ci95": ci}
            else:
                row["auroc"] = None
            c = binary_counts(yp, pp, threshold)
            row["sensitivity"] = rate(c["tp"], c["tp"] + c["fn"])
            row["specificity"] = rate(c["tn"], c["tn"] + c["fp"])
            rows.append(row)
    return rows


# --- threshold ---------------------------------------------------------------------


def oof_scores(fit: Callable, X: np.ndarray, y: np.ndarray, positive: int, seed: int) -> np.ndarray:
    """Out-of-fold P(positive): stratified CV_FOLDS-fold, `fit(X, y)` returns a fitted
    classifier; each row is scored by the model fitted without its fold."""
    skf = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
    oof = np.full(len(y), np.nan)
    for tr, te in skf.split(X, y):
        est = fit(X[tr], y[tr])
        assert list(est.classes_) == list(range(len(est.classes_)))
        oof[te] = est.predict_proba(X[te].astype(np.float32).astype(np.float64))[:, positive]
    assert not np.isnan(oof).any()
    return oof


def threshold_for_sensitivity(y_pos: np.ndarray, scores: np.ndarray, target: float) -> tuple[float, float]:
    """(exact, rounded) largest threshold t with mean(scores[y_pos == 1] >= t) >= target."""
    pos = np.sort(scores[y_pos == 1])[::-1]
    k = math.ceil(target * len(pos) - 1e-12)
    exact = float(pos[k - 1])
    return exact, round_down_sig(exact, 6)


def threshold_youden(y_pos: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(exact, rounded) threshold t maximising sensitivity + specificity - 1 for the rule
    `score >= t`, over every distinct score; the lowest such t on ties."""
    npos, nneg = int(y_pos.sum()), int(len(y_pos) - y_pos.sum())
    best_j, best_t = -2.0, None
    for t in np.unique(scores):  # ascending, so the first maximum is the lowest threshold
        pred = scores >= t
        j = np.sum(pred & (y_pos == 1)) / npos + np.sum(~pred & (y_pos == 0)) / nneg - 1
        if j > best_j + 1e-12:
            best_j, best_t = j, float(t)
    return best_t, round_down_sig(best_t, 6)


def choose_threshold(rule: str, y_pos: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    if rule == "sensitivity":
        return threshold_for_sensitivity(y_pos, scores, TARGET_SENSITIVITY)
    if rule == "youden":
        return threshold_youden(y_pos, scores)
    raise ValueError(rule)


# --- bundle building ---------------------------------------------------------------


@dataclass
class VersionSpec:
    version: int
    created: str
    description: str  # one line, for bundle.toml
    model_lines: list[str]  # markdown bullet lines describing the model, for the card
    fit: Callable  # fit(X, y) -> fitted scikit-learn classifier
    graph_name: str
    doc: str  # ONNX doc_string
    expected_sha256: str | None = None  # assert the exported model.onnx has this digest


@dataclass
class BundleSpec:
    name: str
    script: str  # repo-relative path of the training script
    seed: int
    title: str  # one line: what the model estimates (bundle.toml description)
    task_lines: list[str]  # card: intended-use task, markdown
    users: str
    not_intended: str
    input_description: str
    data_lines: list[str]  # card: data section bullets (source, size, licence)
    training_data: str  # provenance.training_data
    data_licence: str
    model_licence: str
    feature_notes: list[str]  # card: paragraph above the feature table
    limitations: list[str]
    testdata_committed: bool  # False: the CSV is git-ignored and rebuilt by --testdata-only
    versions: list[VersionSpec]
    threshold_name: str = "screening"
    threshold_purpose: str = "screening"  # card wording: "the screening operating point"
    threshold_rule: str = "sensitivity"  # a key of THRESHOLD_RULES
    version_policy: str = "latest"
    # `release = N` of bundle.toml (docs/bundle-format.md, "Releases"): raise it with every
    # manifest published, so that `serve` refuses an older signed manifest put back.
    release: int = 1
    subgroup_notes: list[str] = field(default_factory=list)
    card_notes: list[str] = field(default_factory=list)  # extra markdown under the threshold section
    # Other model recipes considered (name -> fit), compared with each version's recipe by
    # out-of-fold AUROC on training+validation (recorded in metrics.json and the card).
    compare_recipes: dict[str, Callable] = field(default_factory=dict)
    # The deployment gate (`[[validation.gate]]`): floors `nightingale validate` holds each
    # version to on its test split; keys metric, threshold, bound, min, max, versions,
    # description (docs/validation.md).
    gate: list[dict] = field(default_factory=list)
    # The gate's minimum-sample rule (`[validation] min_positives` / `min_negatives`, default 10
    # each): set only where the test split holds fewer, with "why" said in bundle.toml.
    gate_min_rows: dict = field(default_factory=dict)

    @property
    def bundle_dir(self) -> Path:
        return BUNDLES / self.name


def threshold_name(spec: BundleSpec, version: int) -> str:
    if len(spec.versions) == 1:
        return spec.threshold_name
    return f"{spec.threshold_name}-v{version}"


def expected_columns(spec: BundleSpec, ds: Dataset) -> list[tuple[int, str]]:
    """(version, CSV column) for every version. The first version's column is
    `expected_p_<positive label>`; later versions append `_v<N>`, so adding a version
    never renames a column an existing reader uses."""
    base = "expected_p_" + ds.positive_label.replace(" ", "_")
    cols = []
    for i, v in enumerate(spec.versions):
        cols.append((v.version, base if i == 0 else f"{base}_v{v.version}"))
    return cols


def fill_ranges(ds: Dataset, split: Split) -> None:
    """Training-split min, max and mean of each feature (the mean is the `[attribution]`
    reference point: in float64, as numpy computes it)."""
    mins, maxs = ds.X[split.train].min(axis=0), ds.X[split.train].max(axis=0)
    means = ds.X[split.train].mean(axis=0, dtype=np.float64)
    for j, f in enumerate(ds.features):
        f.min, f.max = float(mins[j]), float(maxs[j])
        f.mean = float(means[j])


def build_version(spec: BundleSpec, vs: VersionSpec, ds: Dataset, split: Split) -> dict:
    print(f"{spec.name} version {vs.version}:")
    vdir = spec.bundle_dir / str(vs.version)
    X, y = ds.X, ds.y
    est = vs.fit(X[split.train], y[split.train])
    assert list(est.classes_) == list(range(len(ds.labels))), est.classes_

    model_path = vdir / "model.onnx"
    onx = export_onnx(est, vs.graph_name, X.shape[1], vs.doc, model_path)
    digest = sha256(model_path)
    if vs.expected_sha256 is not None:
        assert digest == vs.expected_sha256, f"{model_path}: sha256 {digest}, expected {vs.expected_sha256}"
    model = OrtModel(model_path)
    onnx_check = check_export(onx, model, est, X)

    # Operating threshold from out-of-fold scores on train+validation.
    trval = split.trval
    oof = oof_scores(vs.fit, X[trval], y[trval], ds.positive, split.seed)
    ypos_trval = ds.y_pos(trval)
    exact, thr = choose_threshold(spec.threshold_rule, ypos_trval, oof)
    cv_counts = binary_counts(ypos_trval, oof, thr)
    cv_sens, cv_spec = sens_spec(cv_counts)
    if spec.threshold_rule == "sensitivity":
        assert cv_sens >= TARGET_SENSITIVITY
    # The other rule's threshold on the same scores, for the card's comparison.
    alternatives = {}
    for rule in THRESHOLD_RULES:
        if rule == spec.threshold_rule:
            continue
        _, alt = choose_threshold(rule, ypos_trval, oof)
        alt_counts = binary_counts(ypos_trval, oof, alt)
        alt_sens, alt_spec = sens_spec(alt_counts)
        alternatives[rule] = {"value": alt, **alt_counts, "sensitivity": alt_sens, "specificity": alt_spec}
    _, prob_val = model.run(X[split.val])
    ypos_val = ds.y_pos(split.val)
    val_counts = binary_counts(ypos_val, prob_val[:, ds.positive].astype(np.float64), thr)
    val_sens, val_spec = sens_spec(val_counts)
    print(
        f"  threshold {thr!r} (exact {exact!r}): cross-validated sensitivity {cv_sens:.4f} "
        f"specificity {cv_spec:.4f}; validation split (final model) sensitivity {val_sens:.4f} "
        f"specificity {val_spec:.4f}"
    )

    # Test split, once.
    _, prob_test = model.run(X[split.test])
    p_test = prob_test[:, ds.positive].astype(np.float64)
    ypos_test = ds.y_pos(split.test)
    test = evaluate(ypos_test, p_test, thr, split.seed)
    test["argmax_accuracy"] = float(np.mean(np.argmax(prob_test, axis=1) == y[split.test]))
    sub_test = subgroup_table(
        {k: v[split.test] for k, v in ds.subgroups.items()}, ypos_test, p_test, thr, split.seed,
        ds.subgroup_order,
    )
    sub_cv = subgroup_table(
        {k: v[trval] for k, v in ds.subgroups.items()}, ypos_trval, oof, thr, split.seed, ds.subgroup_order
    )
    cv_auroc = float(roc_auc_score(ypos_trval, oof))
    recipes = {}
    for rname, rfit in spec.compare_recipes.items():
        r_oof = oof_scores(rfit, X[trval], y[trval], ds.positive, split.seed)
        recipes[rname] = float(roc_auc_score(ypos_trval, r_oof))
        print(f"  recipe comparison: {rname} cross-validated AUROC {recipes[rname]:.3f} (this version {cv_auroc:.3f})")

    pos, neg = ds.positive_label, ds.negative_label
    metrics = {
        "model": spec.name,
        "version": vs.version,
        "split": {
            "seed": split.seed,
            "method": "stratified train/validation/test 60/20/20 (sklearn train_test_split)",
            "train": int(len(split.train)),
            "validation": int(len(split.val)),
            "test": int(len(split.test)),
            f"test_{pos}": int(ypos_test.sum()),
            f"test_{neg}": int(len(ypos_test) - ypos_test.sum()),
        },
        "positive_label": pos,
        "score": f"probabilities[:, {ds.positive}] (P({pos})) from onnxruntime",
        "threshold": {
            "name": threshold_name(spec, vs.version),
            "value": thr,
            "exact": exact,
            "rule": f"p_{pos.replace(' ', '_')} >= value",
            "chosen_on": "training+validation, out-of-fold",
            "rule_name": spec.threshold_rule,
            "criterion": THRESHOLD_RULES[spec.threshold_rule].format(pos=pos),
            "cross_validation": {
                "folds": CV_FOLDS,
                "seed": split.seed,
                "n": int(len(trval)),
                "positives": int(ypos_trval.sum()),
                **cv_counts,
                "sensitivity": cv_sens,
                "specificity": cv_spec,
                "auroc": cv_auroc,
            },
            "validation": {**val_counts, "sensitivity": val_sens, "specificity": val_spec},
            "alternative_rules_cross_validation": alternatives,
        },
        "test": test,
        "recipe_comparison_cv_auroc": {"this version": cv_auroc, **recipes},
        "subgroups": {
            "min_per_class_for_auroc": MIN_PER_CLASS_FOR_AUROC,
            "test": sub_test,
            "cross_validation": sub_cv,
        },
        "onnx": onnx_check,
        "software": {
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
    }
    metrics_path = vdir / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    a = test["at_threshold"]
    print(
        f"  test: AUROC {test['auroc']['value']:.3f} {fmt_ci(test['auroc']['ci95'])}, "
        f"sensitivity {a['sensitivity']['value']:.3f} ({a['sensitivity']['k']}/{a['sensitivity']['n']}), "
        f"specificity {a['specificity']['value']:.3f}, Brier {test['brier']['value']:.4f}"
    )
    print(f"  model.onnx sha256={digest}")
    # The load-time self-test: seeded rows within the training ranges, onnxruntime's outputs.
    selftest_path = selftest.write_for_bundle(spec.bundle_dir, vs.version, selftest_manifest(ds))
    return {
        "spec": vs,
        "metrics": metrics,
        "prob_test": prob_test,
        "files": {
            "metrics.json": sha256(metrics_path),
            "model.onnx": digest,
            "selftest.json": sha256(selftest_path),
        },
    }


def selftest_manifest(ds: Dataset) -> dict:
    """The parts of bundle.toml that selftest.py draws its inputs from."""
    features = [{"min": f.min, "max": f.max} for f in ds.features]
    return {"inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, len(features)], "features": features}]}


def write_test_csv(spec: BundleSpec, ds: Dataset, split: Split, probs: dict[int, np.ndarray], out: Path) -> None:
    """features..., label (1 = positive), subgroup columns, expected_p_* (onnxruntime)."""
    names = [f.name for f in ds.features]
    cols = expected_columns(spec, ds)
    header = names + ["label"] + list(ds.subgroups) + [c for _, c in cols]
    lines = [",".join(header)]
    ypos = ds.y_pos(split.test)
    for r, i in enumerate(split.test):
        row = [repr(float(v)) for v in ds.X[i]]
        row.append(str(int(ypos[r])))
        row.extend(str(ds.subgroups[k][i]) for k in ds.subgroups)
        row.extend(repr(float(probs[v][r, ds.positive])) for v, _ in cols)
        lines.append(",".join(row))
    for cell in header:
        assert "," not in cell and '"' not in cell, cell
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out} ({len(split.test)} rows)")


def regenerate_testdata(spec: BundleSpec, ds: Dataset, split: Split, out: Path) -> None:
    """Rebuild testdata/test.csv from the package data and the committed model files
    (checked against bundle.toml), without retraining."""
    manifest = tomllib.loads((spec.bundle_dir / "bundle.toml").read_text(encoding="utf-8"))
    probs = {}
    for vs in spec.versions:
        path = spec.bundle_dir / str(vs.version) / "model.onnx"
        want = manifest["versions"][str(vs.version)]["files"]["model.onnx"]
        got = sha256(path)
        assert got == want, f"{path}: sha256 {got}, bundle.toml says {want}"
        _, probs[vs.version] = OrtModel(path).run(ds.X[split.test])
    write_test_csv(spec, ds, split, probs, out)


def parse_args(spec: BundleSpec, argv: list[str] | None):
    ap = argparse.ArgumentParser(description=f"Train and export the `{spec.name}` bundle.")
    ap.add_argument(
        "--testdata-only",
        action="store_true",
        help="only (re)write the test split CSV from the data and the committed model files",
    )
    ap.add_argument(
        "--manifest-only",
        action="store_true",
        help="only rewrite (and re-sign) bundle.toml from the data and the committed version files, without retraining",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=spec.bundle_dir / "testdata" / "test.csv",
        help="where --testdata-only writes the CSV (default: the bundle's testdata/test.csv)",
    )
    return ap.parse_args(argv)


def run(spec: BundleSpec, ds: Dataset, argv: list[str] | None = None, check_split: Callable | None = None) -> int:
    args = parse_args(spec, argv)
    split = stratified_split(ds.y, spec.seed)
    print(f"{spec.name}: split train={len(split.train)} validation={len(split.val)} test={len(split.test)}")
    if check_split is not None:
        check_split(split)
    if args.testdata_only:
        regenerate_testdata(spec, ds, split, args.out)
        return 0
    fill_ranges(ds, split)
    if args.manifest_only:
        write_bundle_toml(spec, ds, committed_results(spec), split)
        return 0
    results = [build_version(spec, vs, ds, split) for vs in spec.versions]
    write_test_csv(spec, ds, split, {r["spec"].version: r["prob_test"] for r in results},
                   spec.bundle_dir / "testdata" / "test.csv")
    write_bundle_toml(spec, ds, results, split)
    write_model_card(spec, ds, split, results)
    return 0


# --- bundle.toml -------------------------------------------------------------------


def committed_results(spec: BundleSpec) -> list[dict]:
    """What write_bundle_toml needs of each version, from the committed files (no retraining)."""
    out = []
    for vs in spec.versions:
        vdir = spec.bundle_dir / str(vs.version)
        metrics = json.loads((vdir / "metrics.json").read_text(encoding="utf-8"))
        files = {f: sha256(vdir / f) for f in ("model.onnx", "metrics.json", "selftest.json")}
        out.append({"spec": vs, "metrics": metrics, "files": files})
    return out


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


# `[explain]` of the tabular bundles (docs/explain.md): KernelSHAP against a background of
# EXPLAIN_BACKGROUND training rows (seeded), and the exact linear contributions.
EXPLAIN_BACKGROUND = 32
EXPLAIN_MAX_FORWARD_PASSES = 65536


def explain_background(ds: Dataset, split: Split, seed: int) -> np.ndarray:
    """EXPLAIN_BACKGROUND rows of the training split (seeded), as the FP32 the model reads."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(split.train, size=min(EXPLAIN_BACKGROUND, len(split.train)), replace=False))
    return ds.X[rows].astype(np.float32)


def write_bundle_toml(spec: BundleSpec, ds: Dataset, results: list[dict], split: Split) -> None:
    out: list[str] = []
    w = out.append
    nf = len(ds.features)
    w(f"# Generated by {spec.script} -- edit the script, not this file.")
    w("format_version = 1")
    w(f"name = {toml_str(spec.name)}")
    w('task = "tabular-risk"')
    w(f"description = {toml_str(spec.title)}")
    w('platform = "onnx"')
    w('backend = "any"')
    w(f"release = {spec.release}")
    w("")
    w("[version_policy]")
    w(f"policy = {toml_str(spec.version_policy)}")
    if spec.version_policy == "latest":
        w("latest = 1")
    w("")
    w("[batching]")
    w("max_batch_size = 64")
    w("max_queue_delay_us = 200")
    w("preferred_batch_sizes = [64]")
    w("instances = 1")
    w("queue_capacity = 1024")
    w("")
    w("[[inputs]]")
    w('name = "features"')
    w('datatype = "FP32"')
    w(f"shape = [-1, {nf}]")
    w(f"description = {toml_str(spec.input_description)}")
    for f in ds.features:
        w("")
        w("[[inputs.features]]")
        w(f"name = {toml_str(f.name)}")
        w(f"unit = {toml_str(f.unit)}")
        if f.description:
            w(f"description = {toml_str(f.description)}")
        if f.code:
            w(f"code = {toml_str(f.code)}")
        if f.fhir:
            w(f"fhir = {toml_str(f.fhir)}")
        if f.conditions:
            w("conditions = [" + ", ".join(toml_str(c) for c in f.conditions) + "]")
        if f.encounter_class:
            w("encounter_class = [" + ", ".join(toml_str(c) for c in f.encounter_class) + "]")
        if f.look_back_hours is not None:
            w(f"look_back_hours = {float(f.look_back_hours)!r}")
        if f.molar_mass is not None:
            w(f"molar_mass = {float(f.molar_mass)!r}")
        w(f"min = {f.min!r}")
        w(f"max = {f.max!r}")
    w("")
    w("[[outputs]]")
    w('name = "label"')
    w('datatype = "INT64"')
    w("shape = [-1]")
    w('description = "argmax class index into the labels of `probabilities`"')
    w("")
    w("[[outputs]]")
    w('name = "probabilities"')
    w('datatype = "FP32"')
    w(f"shape = [-1, {len(ds.labels)}]")
    w("labels = [" + ", ".join(toml_str(l) for l in ds.labels) + "]")
    w(f"positive_label = {toml_str(ds.positive_label)}")
    for r in results:
        th = r["metrics"]["threshold"]
        cv = th["cross_validation"]
        which = f"version {r['spec'].version}: " if len(results) > 1 else ""
        w("")
        w("[[thresholds]]")
        w(f"name = {toml_str(th['name'])}")
        w('output = "probabilities"')
        w(f"label = {toml_str(ds.positive_label)}")
        w(f"value = {th['value']!r}")
        if spec.threshold_rule == "sensitivity":
            how = (
                f"largest threshold on P({ds.positive_label}) keeping sensitivity >= {TARGET_SENSITIVITY:.0%}"
            )
        else:
            how = f"threshold on P({ds.positive_label}) maximising Youden's J (sensitivity + specificity - 1)"
        w(
            "description = "
            + toml_str(
                f"{which}{how} on {CV_FOLDS}-fold out-of-fold predictions for the training+validation "
                f"splits ({cv['n']} cases, {cv['positives']} {ds.positive_label})"
            )
        )
    w("")
    w("[intended_use]")
    w(
        'summary = "Research and demonstration of Nightingale\'s tabular risk pipeline. '
        'NOT for clinical use without local validation."'
    )
    w(f"users = {toml_str(spec.users)}")
    w("limitations = [")
    for lim in spec.limitations:
        w(f"  {toml_str(lim)},")
    w("]")
    w("")
    w("[provenance]")
    w(f"training_data = {toml_str(spec.training_data)}")
    w(f"data_licence = {toml_str(spec.data_licence)}")
    w(f"model_licence = {toml_str(spec.model_licence)}")
    w(f"training_script = {toml_str(spec.script)}")
    w("")
    w("[attribution]")
    w("# contributions to a prediction are measured from the training split's mean of each feature")
    w('reference = "training-mean"')
    w("means = [" + ", ".join(repr(f.mean) for f in ds.features) + "]")
    w("")
    w("[explain]")
    w("# POST /v2/models/{m}/explain: KernelSHAP against training rows, and (linear-logistic")
    w("# versions) the exact contributions from the [attribution] means")
    w('methods = ["kernel_shap", "linear"]')
    w(f"max_forward_passes = {EXPLAIN_MAX_FORWARD_PASSES}")
    w(f"# {EXPLAIN_BACKGROUND} rows of the training split, drawn with the bundle's seed")
    w("background = [")
    for row in explain_background(ds, split, spec.seed):
        w("  [" + ", ".join(repr(float(v)) for v in row) + "],")
    w("]")
    w("")
    out.extend(selftest.selftest_toml(exact=("label",)))
    for r in results:
        vs = r["spec"]
        w("")
        w(f"[versions.{vs.version}]")
        w(f"description = {toml_str(vs.description)}")
        w(f"created = {toml_str(vs.created)}")
        w("")
        w(f"[versions.{vs.version}.files]")
        for fname in ("model.onnx", "metrics.json", "selftest.json"):
            w(f'"{fname}" = "{r["files"][fname]}"')
    out.extend(gate_toml(spec))
    text = "\n".join(out) + "\n"

    parsed = tomllib.loads(text)  # fail here rather than in the server
    assert len(parsed["inputs"][0]["features"]) == nf
    assert [t["value"] for t in parsed["thresholds"]] == [r["metrics"]["threshold"]["value"] for r in results]
    allowed_feature_keys = {"name", "unit", "description", "code", "fhir", "conditions", "encounter_class", "min", "max",
                            "look_back_hours", "molar_mass"}
    for f in parsed["inputs"][0]["features"]:
        assert set(f) <= allowed_feature_keys, f
    (spec.bundle_dir / "bundle.toml").write_text(text, encoding="utf-8")
    sign_bundle(spec.bundle_dir)


def gate_toml(spec: BundleSpec) -> list[str]:
    """The `[[validation.gate]]` tables of bundle.toml (appended after the versions)."""
    lines: list[str] = []
    floors = {k: v for k, v in spec.gate_min_rows.items() if k in ("min_positives", "min_negatives")}
    if floors:
        lines.append("")
        if "why" in spec.gate_min_rows:
            lines.append(f"# {spec.gate_min_rows['why']}")
        lines.append("[validation]")
        lines += [f"{k} = {int(v)}" for k, v in floors.items()]
    for i, g in enumerate(spec.gate):
        lines.append("")
        if i == 0:
            lines.append("# `nightingale validate` exits 1 when a version misses one of these on a dataset")
        lines.append("[[validation.gate]]")
        for key in ("metric", "threshold", "bound", "min", "max", "versions", "description"):
            if key not in g:
                continue
            v = g[key]
            if isinstance(v, str):
                lines.append(f"{key} = {toml_str(v)}")
            elif isinstance(v, list):
                lines.append(f"{key} = [" + ", ".join(str(int(x)) for x in v) + "]")
            else:
                lines.append(f"{key} = {float(v)!r}")
    return lines


# --- MODEL_CARD.md -----------------------------------------------------------------


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_ci(c: list[float], as_pct: bool = False) -> str:
    if as_pct:
        return f"{pct(c[0])} to {pct(c[1])}"
    return f"{c[0]:.3f} to {c[1]:.3f}"


def fmt_num(x: float) -> str:
    return f"{x:g}"


def write_model_card(spec: BundleSpec, ds: Dataset, split: Split, results: list[dict]) -> None:
    L: list[str] = []
    w = L.append
    pos, neg = ds.positive_label, ds.negative_label
    versions = [r["spec"].version for r in results]
    vtxt = ", ".join(str(v) for v in versions)
    m0 = results[0]["metrics"]
    s = m0["split"]
    n_total = len(ds.y)
    npos_total = int(ds.y_pos().sum())
    prevalence = s[f"test_{pos}"] / s["test"]
    multi = len(results) > 1

    w(f"<!-- Generated by {spec.script} -- edit the script, not this file. -->")
    w(f"# Model card: {spec.name} (version{'s' if multi else ''} {vtxt})")
    w("")
    w("> **NOT for clinical use without local validation.** This model exists to demonstrate and test")
    w("> Nightingale's tabular-risk pipeline. It has not been validated prospectively or outside the")
    w("> data set it was trained on.")
    w("")
    w("## Intended use")
    w("")
    L.extend(spec.task_lines)
    w(f"- **Users:** {spec.users}.")
    w(f"- **Not intended for:** {spec.not_intended}")
    w("")
    w("## Data")
    w("")
    L.extend(spec.data_lines)
    w(
        f"- Split (seed {s['seed']}, stratified on the outcome, 60/20/20): train {s['train']}, validation "
        f"{s['validation']}, test {s['test']} ({s[f'test_{pos}']} {pos}, {s[f'test_{neg}']} {neg}); "
        f"overall {npos_total} of {n_total} cases ({pct(npos_total / n_total)}) have the positive label `{pos}`."
    )
    csv_cols = ", ".join(f"`{c}` (version {v})" for v, c in expected_columns(spec, ds))
    sub_cols = "".join(f", `{k}`" for k in ds.subgroups)
    if spec.testdata_committed:
        w(f"- The test split is in `testdata/test.csv`: the {len(ds.features)} feature columns, `label`")
        w(f"  (1 = {pos}){sub_cols} and onnxruntime's P({pos}): {csv_cols}.")
    else:
        w("- **The test split is not committed** (the data licence does not allow redistributing it in this")
        w("  repository). Rebuild `testdata/test.csv` from the installed package and the committed model")
        w("  files, without retraining, with")
        w(f"  `.venv/bin/python {spec.script} --testdata-only` (add `--out PATH` to write it elsewhere);")
        w(f"  it holds the {len(ds.features)} feature columns, `label` (1 = {pos}){sub_cols} and onnxruntime's")
        w(f"  P({pos}): {csv_cols}. The path is git-ignored.")
    w("")
    w("## Input features")
    w("")
    L.extend(spec.feature_notes)
    w("")
    w("| # | feature | unit | code | train min | train max | description |")
    w("|---|---|---|---|---|---|---|")
    for j, f in enumerate(ds.features):
        code = f"`{f.code}`".replace("|", "\\|") if f.code else ""  # a bare | splits a table cell
        w(f"| {j} | {f.name} | `{f.unit}` | {code} | {fmt_num(f.min)} | {fmt_num(f.max)} | {f.description} |")
    w("")
    w("## Model" + ("s" if multi else ""))
    w("")
    if multi:
        w(f"All versions are served (`version_policy = \"{spec.version_policy}\"`); a request that names no")
        w(f"version gets the highest ({max(versions)}). Each has its own threshold.")
        w("")
    for r in results:
        vs, m = r["spec"], r["metrics"]
        o = m["onnx"]
        if multi:
            w(f"### Version {vs.version}")
            w("")
        L.extend(vs.model_lines)
        comp = m["recipe_comparison_cv_auroc"]
        if len(comp) > 1:
            w(
                f"- Recipe comparison, AUROC of {CV_FOLDS}-fold out-of-fold predictions on training+validation: "
                + "; ".join(f"{k} {v:.3f}" for k, v in comp.items())
                + "."
            )
        w(
            f"- Exported with skl2onnx {m['software']['skl2onnx']} (scikit-learn {m['software']['scikit-learn']}); "
            f"ONNX operators {', '.join('`' + op + '`' for op in o['ops'])}; opsets "
            + ", ".join(f"{k} {v}" for k, v in sorted(o["opsets"].items()))
            + "."
        )
        w(
            f"- Input `features` FP32 `[N, {len(ds.features)}]` (dynamic batch dimension); outputs `label` INT64 `[N]` "
            f"(argmax index into the labels) and `probabilities` FP32 `[N, {len(ds.labels)}]`, columns "
            + "`[" + ", ".join(ds.labels) + "]`."
        )
        w(
            f"- onnxruntime vs scikit-learn `predict_proba` on all {o['framework_rows_compared']} cases: max abs "
            f"difference {o['max_abs_diff_vs_framework']:.1e}; batches of 1 and 7 vs one batch of all: "
            f"{o['max_abs_diff_batch_1_or_7_vs_all']:.1e}."
        )
        w("")
    w("## Operating threshold")
    w("")
    w(f"- **Rule:** {THRESHOLD_RULES[spec.threshold_rule].format(pos=pos)}.")
    w(f"- **Why:** {THRESHOLD_RATIONALES[spec.threshold_rule]}")
    w(f"- The `label` output is the argmax (a 0.5 threshold), not the {spec.threshold_purpose} operating point.")
    w("")
    w("| version | threshold name | call " + pos + " when | CV sensitivity | CV specificity | validation sensitivity | validation specificity |")
    w("|---|---|---|---|---|---|---|")
    for r in results:
        th = r["metrics"]["threshold"]
        cv, va = th["cross_validation"], th["validation"]
        w(
            f"| {r['spec'].version} | `{th['name']}` | `probabilities[:, {ds.positive}] >= {th['value']!r}` | "
            f"{pct(cv['sensitivity'])} ({cv['tp']}/{cv['tp'] + cv['fn']}) | {pct(cv['specificity'])} "
            f"({cv['tn']}/{cv['tn'] + cv['fp']}) | {pct(va['sensitivity'])} ({va['tp']}/{va['tp'] + va['fn']}) | "
            f"{pct(va['specificity'])} ({va['tn']}/{va['tn'] + va['fp']}) |"
        )
    w("")
    w(f"CV: the {CV_FOLDS}-fold out-of-fold predictions on training+validation "
      f"({m0['threshold']['cross_validation']['n']} cases) that the threshold was chosen on.")
    w("Validation: the served model (trained on the training split) on the validation split.")
    w("")
    w("For comparison, the other rule on the same cross-validated scores:")
    w("")
    for r in results:
        th = r["metrics"]["threshold"]
        for rule, alt in th["alternative_rules_cross_validation"].items():
            name = {"sensitivity": f"sensitivity >= {TARGET_SENSITIVITY:.0%}", "youden": "Youden point"}[rule]
            w(
                f"- {'version ' + str(r['spec'].version) + ', ' if multi else ''}{name}: threshold {alt['value']!r}, "
                f"CV sensitivity {pct(alt['sensitivity'])} ({alt['tp']}/{alt['tp'] + alt['fn']}), "
                f"CV specificity {pct(alt['specificity'])} ({alt['tn']}/{alt['tn'] + alt['fp']})."
            )
    if spec.card_notes:
        w("")
        L.extend(spec.card_notes)
    w("")
    w("## Test-split performance")
    w("")
    w(f"Measured once on the held-out test split ({s['test']} cases, {s[f'test_{pos}']} {pos}) with each ONNX")
    w(f"model in onnxruntime. AUROC and Brier CIs: percentile bootstrap ({N_BOOTSTRAP} resamples, seed {s['seed']});")
    w("rates: Wilson score intervals.")
    w("")
    head = "| metric | " + " | ".join(f"version {v}" for v in versions) + " |"
    w(head)
    w("|---" * (len(versions) + 1) + "|")

    def row(name: str, cell: Callable[[dict], str]) -> None:
        w(f"| {name} | " + " | ".join(cell(r["metrics"]) for r in results) + " |")

    row("threshold", lambda m: f"{m['threshold']['value']!r}")
    row("AUROC", lambda m: f"{m['test']['auroc']['value']:.3f} ({fmt_ci(m['test']['auroc']['ci95'])})")
    for key, name in (("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("ppv", "PPV"), ("npv", "NPV")):
        row(
            name,
            lambda m, key=key: (
                f"{pct(m['test']['at_threshold'][key]['value'])} ({m['test']['at_threshold'][key]['k']}/"
                f"{m['test']['at_threshold'][key]['n']}; {fmt_ci(m['test']['at_threshold'][key]['ci95'], True)})"
            ),
        )
    row("Brier score", lambda m: f"{m['test']['brier']['value']:.4f} ({fmt_ci(m['test']['brier']['ci95'])})")
    row("Accuracy of argmax `label`", lambda m: pct(m["test"]["argmax_accuracy"]))
    row(
        "Confusion at threshold",
        lambda m: "TP {tp}, FN {fn}, TN {tn}, FP {fp}".format(**m["test"]["at_threshold"]),
    )
    w("")
    w(f"PPV and NPV depend on prevalence ({pct(prevalence)} {pos} in the test split) and will differ in other")
    w("populations.")
    for r in results:
        a = r["metrics"]["test"]["at_threshold"]["sensitivity"]
        if spec.threshold_rule == "sensitivity" and a["value"] < TARGET_SENSITIVITY:
            lo, hi = a["ci95"]
            w("")
            w(
                f"Version {r['spec'].version}: test sensitivity {pct(a['value'])} ({a['k']}/{a['n']}) is below the "
                f"{TARGET_SENSITIVITY:.0%} target; its 95% CI ({pct(lo)} to {pct(hi)}) "
                + ("includes" if hi >= TARGET_SENSITIVITY else "does not include")
                + " the target. A local deployment must re-choose the threshold on local data."
            )
    w("")
    w("## Subgroups")
    w("")
    if not ds.subgroups:
        L.extend(spec.subgroup_notes or ["The data set records no demographic or other subgroup variables."])
    else:
        L.extend(spec.subgroup_notes)
        if spec.subgroup_notes:
            w("")
        w(f"AUROC is given where the subgroup has at least {MIN_PER_CLASS_FOR_AUROC} {pos} and {MIN_PER_CLASS_FOR_AUROC} {neg}")
        w("cases (95% bootstrap CI), else `n too small`. The test split is small, so the same table is also")
        w(f"given for the {CV_FOLDS}-fold out-of-fold predictions on training+validation (models refitted per fold,")
        w("so these are cross-validated estimates of the recipe, not of the served model).")
        for r in results:
            m = r["metrics"]
            for which, title in (("test", "test split"), ("cross_validation", "training+validation, out-of-fold")):
                w("")
                w(f"**{'Version ' + str(r['spec'].version) + ', ' if multi else ''}{title}** (threshold {m['threshold']['value']!r}):")
                w("")
                w(f"| variable | level | n | {pos} | AUROC (95% CI) | sensitivity | specificity |")
                w("|---|---|---|---|---|---|---|")
                for g in m["subgroups"][which]:
                    au = g["auroc"]
                    au_txt = f"{au['value']:.3f} ({fmt_ci(au['ci95'])})" if au else "n too small"
                    se, sp = g["sensitivity"], g["specificity"]
                    w(
                        f"| {g['variable']} | {g['level']} | {g['n']} | {g['positives']} | {au_txt} | "
                        f"{pct(se['value'])} ({se['k']}/{se['n']}) | {pct(sp['value'])} ({sp['k']}/{sp['n']}) |"
                    )
    w("")
    w("## Limitations")
    w("")
    for lim in spec.limitations:
        w(f"- {lim}.")
    w("")
    w("## Reproduce")
    w("")
    w("```sh")
    w("python3 -m venv .venv && .venv/bin/pip install -r models/train/requirements.txt")
    w(f".venv/bin/python {spec.script}        # or models/train/build_all.sh for every bundle")
    w("```")
    w("")
    w("The build is deterministic: rerunning it reproduces each `model.onnx` and `metrics.json` byte for")
    w("byte (their SHA-256 digests are recorded in `bundle.toml`). `metrics.json` in each version folder")
    w("holds every number in this card.")
    (spec.bundle_dir / "MODEL_CARD.md").write_text("\n".join(L) + "\n", encoding="utf-8")
