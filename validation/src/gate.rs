//! The deployment gate: a bundle's `[[validation.gate]]` criteria checked against a report,
//! after a minimum-sample rule (`[validation] min_positives` / `min_negatives`): a gate does
//! not pass on too few rows of either class, however good its numbers look on them.

use nightingale_models::manifest::{GateCriterion, ValidationSpec};
use serde::Serialize;

use crate::multiclass::MulticlassMetrics;
use crate::report::{Metric, Metrics, Settings};

/// One criterion and what the report says.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CriterionResult {
    /// `metric[@threshold][.bound]`, e.g. `sensitivity@screening-v1.ci_lower`.
    pub criterion: String,
    pub metric: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<String>,
    pub bound: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The number read from the report (`None`: not defined on this dataset).
    pub observed: Option<f64>,
    pub passed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// Every criterion's outcome; `passed` when all pass.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateResult {
    pub passed: bool,
    pub criteria: Vec<CriterionResult>,
}

/// Whether `a` is below `b` by more than floating-point rounding ([`AT_LIMIT`], relative to
/// the larger magnitude, at least absolute): a metric at its limit passes. Compared exactly,
/// a Brier score of exactly 0.09 computed as 0.09000000000000005 failed `max = 0.09` with
/// "0.0900 is above the maximum 0.09", and an ECE of 0.3 computed as 0.29999999999999993
/// passed a minimum of 0.3 by luck of the rounding (a review's finding).
fn below(a: f64, b: f64) -> bool {
    a < b - AT_LIMIT * a.abs().max(b.abs()).max(1.0)
}

/// How near a limit a metric counts as at it: far above the rounding of sums over millions
/// of rows, far below any difference a gate is written to tell apart.
const AT_LIMIT: f64 = 1e-9;

/// A metric's value in a gate's reason: four decimals, or every digit where four would read
/// as its limit (`0.0900 is above the maximum 0.09` puzzled a review).
fn shown(v: f64, limit: f64) -> String {
    let four = format!("{v:.4}");
    if four.parse::<f64>().ok() == Some(limit) {
        format!("{v}")
    } else {
        four
    }
}

fn find<'m>(metrics: &'m Metrics, c: &GateCriterion) -> Option<&'m Metric> {
    match &c.threshold {
        None => metrics.metric(&c.metric),
        Some(t) => metrics
            .operating_points
            .iter()
            .find(|op| op.source == "bundle" && &op.name == t)
            .and_then(|op| op.metric(&c.metric)),
    }
}

/// One side of the minimum-sample rule: the count the gate reads and, when it is short, why.
struct Count {
    has: usize,
    /// What follows `needs at least {min} ` in the reason ("positive rows, has 2").
    short: String,
}

/// The gate's minimum-sample rule as two criteria, `min_positives` and `min_negatives`, listed
/// before the bundle's own. They are criteria like the others (in the report, the HTML page,
/// the printed summary and the exit code) so that a gate failed for want of rows says so
/// where every other failure is said.
fn sample_criteria(
    spec: &ValidationSpec,
    positives: Count,
    negatives: Count,
) -> [CriterionResult; 2] {
    let rule = |key: &str, metric: &str, declared: Option<u64>, min: u64, count: Count| {
        let passed = count.has as u64 >= min;
        CriterionResult {
            criterion: key.to_owned(),
            metric: metric.to_owned(),
            threshold: None,
            bound: "value",
            min: Some(min as f64),
            max: None,
            observed: Some(count.has as f64),
            passed,
            reason: (!passed).then(|| format!("needs at least {min} {}", count.short)),
            description: match declared {
                Some(_) => format!("[validation] {key} of the bundle"),
                None => format!("default {key} (docs/validation.md)"),
            },
        }
    };
    [
        rule(
            "min_positives",
            "positives",
            spec.min_positives,
            spec.min_positives(),
            positives,
        ),
        rule(
            "min_negatives",
            "negatives",
            spec.min_negatives,
            spec.min_negatives(),
            negatives,
        ),
    ]
}

/// The rule on unusable rows: at most the bundle's `max_unusable_fraction` (default a tenth)
/// of the rows read may have been set aside (a red-team finding: a dataset with 76 of 114
/// rows unusable passed its gate on the other 38, which missing inputs may have made the
/// easy ones). `used + unusable` is every row read.
pub fn unusable_rows(spec: &ValidationSpec, used: usize, unusable: usize) -> CriterionResult {
    let max = spec.max_unusable_fraction();
    let read = used + unusable;
    let fraction = if read == 0 {
        0.0
    } else {
        unusable as f64 / read as f64
    };
    let passed = fraction <= max;
    CriterionResult {
        criterion: "max_unusable_fraction".to_owned(),
        metric: "unusable_fraction".to_owned(),
        threshold: None,
        bound: "value",
        min: None,
        max: Some(max),
        observed: Some(fraction),
        passed,
        reason: (!passed).then(|| {
            format!(
                "{unusable} of the {read} rows read were unusable ({:.1} %, at most {:.1} %): the metrics describe the other rows only",
                fraction * 100.0,
                max * 100.0
            )
        }),
        description: match spec.max_unusable_fraction {
            Some(_) => "[validation] max_unusable_fraction of the bundle".to_owned(),
            None => "default max_unusable_fraction (docs/validation.md)".to_owned(),
        },
    }
}

/// Checks each criterion that holds for `version` against a binary report; a metric the
/// report does not define fails its criterion, and so does a dataset with fewer positive or
/// negative rows than the bundle's minimum (default 10 of each).
///
/// With rows clustered by patient (`--patient-id-column`), the rule counts patients (with a
/// positive row, with a negative row), not rows: a hundred rows of one patient are one
/// patient's evidence.
pub fn check(
    spec: &ValidationSpec,
    version: Option<u64>,
    metrics: &Metrics,
    settings: &Settings,
) -> GateResult {
    let (pos, neg, what) = match metrics.patients {
        Some(p) => (p.positives, p.negatives, "patients"),
        None => (metrics.positives, metrics.negatives, "rows"),
    };
    let sample = sample_criteria(
        spec,
        Count {
            has: pos,
            short: format!("positive {what}, has {pos}"),
        },
        Count {
            has: neg,
            short: format!("negative {what}, has {neg}"),
        },
    );
    check_with(spec, version, sample, settings, |c| find(metrics, c))
}

/// Checks against a multi-class report: `auroc`, `auprc` (macro means) and `brier`; a
/// criterion on any other metric fails ("not in the report"). The minimum-sample rule holds
/// one-vs-rest for every class present (the classes the macro means average): each needs
/// `min_positives` rows of its own and `min_negatives` rows of the other classes; a class
/// absent from the dataset is left out of the means and of the rule. With rows clustered by
/// patient, the rule counts patients (with a row of the class, with a row of another class).
pub fn check_multiclass(
    spec: &ValidationSpec,
    version: Option<u64>,
    m: &MulticlassMetrics,
    settings: &Settings,
) -> GateResult {
    let present = || m.classes.iter().filter(|c| c.n > 0);
    let clustered = m.patients.is_some();
    let what = if clustered { "patients" } else { "rows" };
    let inside = |c: &crate::multiclass::ClassMetrics| c.patients.unwrap_or(c.n);
    let outside_of = |c: &crate::multiclass::ClassMetrics| c.patients_outside.unwrap_or(m.n - c.n);
    // Every class of the output counts for the sample, those the dataset lacks included: a
    // gate passed on a dataset holding 2 of the image model's 8 classes, the others left out
    // of the means and so of the rule (a review's finding). The means stay over the classes
    // present; the sample rule fails the gate on a class with too few rows, or none.
    let fewest = m
        .classes
        .iter()
        .min_by_key(|c| inside(c))
        .map_or((0, "(none)".to_owned()), |c| (inside(c), c.label.clone()));
    let outside = present()
        .min_by_key(|c| outside_of(c))
        .map_or((0, "(none)".to_owned()), |c| {
            (outside_of(c), c.label.clone())
        });
    let sample = sample_criteria(
        spec,
        Count {
            has: fewest.0,
            short: format!(
                "{what} of each class, class {:?} has {}",
                fewest.1, fewest.0
            ),
        },
        Count {
            has: outside.0,
            short: format!(
                "{what} outside each class present, class {:?} has {}",
                outside.1, outside.0
            ),
        },
    );
    check_with(spec, version, sample, settings, |c| {
        match (c.metric.as_str(), &c.threshold) {
            ("auroc", None) => Some(&m.auroc),
            ("auprc", None) => Some(&m.auprc),
            ("brier", None) => Some(&m.brier),
            _ => None,
        }
    })
}

/// The fewest bootstrap replicates behind a percentile interval whose limit a gate reads.
/// With fewer, the limits are mostly resampling noise, and a caller who chooses the count
/// and the seed (the validation API lets a researcher) could try until one passes: a
/// review passed a gate whose 2,000-replicate lower limit failed it by asking for one
/// replicate. 1,000 is the usual floor for percentile intervals (Efron & Tibshirani, 1993).
pub const MIN_GATE_REPLICATES: usize = 1000;

/// The confidence level a gate's `ci_lower` / `ci_upper` is read at.
pub const GATE_CONFIDENCE: f64 = 0.95;
/// The calibration bins a gate's `ece` is read with.
pub const GATE_CALIBRATION_BINS: usize = 10;

/// Why a criterion cannot be judged at the report's settings: a confidence limit read at
/// another level than [`GATE_CONFIDENCE`], or an ECE over other bins than
/// [`GATE_CALIBRATION_BINS`]. The bundle's signed gate means the usual ones; a run at a
/// looser level (`--confidence 0.51`) or with one bin (calibration-in-the-large only)
/// passed gates that fail at them (a red-team finding), so such a criterion fails.
pub fn unjudgeable(metric: &str, bound: &str, settings: &Settings) -> Option<String> {
    if matches!(bound, "ci_lower" | "ci_upper") && settings.confidence != GATE_CONFIDENCE {
        return Some(format!(
            "the report's intervals are at {} %; a gate on a confidence limit reads the {} % \
             interval (--confidence {GATE_CONFIDENCE})",
            settings.confidence * 100.0,
            GATE_CONFIDENCE * 100.0
        ));
    }
    if metric == "ece" && settings.calibration_bins != GATE_CALIBRATION_BINS {
        return Some(format!(
            "the report's ECE is over {} bins; a gate on the ECE reads it over \
             {GATE_CALIBRATION_BINS} (--calibration-bins {GATE_CALIBRATION_BINS})",
            settings.calibration_bins
        ));
    }
    None
}

fn check_with<'m>(
    spec: &ValidationSpec,
    version: Option<u64>,
    sample: [CriterionResult; 2],
    settings: &Settings,
    find: impl Fn(&GateCriterion) -> Option<&'m Metric>,
) -> GateResult {
    let declared = spec.gate_for(version).into_iter().map(|c| {
        let bound = c.bound.as_str();
        let metric = find(&c);
        let observed = metric.and_then(|m| m.get(bound));
        // the value's reason when there is no value; the interval's when only it is missing
        let why = metric.and_then(|m| match (m.value, bound) {
            (None, _) => m.undefined.clone(),
            (Some(_), "ci_lower" | "ci_upper") => m.ci_undefined.clone(),
            _ => None,
        });
        let replicates = metric
            .filter(|m| m.ci_method == Some("bootstrap-percentile"))
            .and_then(|m| m.bootstrap)
            .map(|b| b.replicates);
        let too_few = matches!(bound, "ci_lower" | "ci_upper")
            && observed.is_some()
            && replicates.is_some_and(|r| r < MIN_GATE_REPLICATES);
        let unjudgeable = unjudgeable(&c.metric, bound, settings);
        let (passed, reason) = match observed {
            Some(_) if unjudgeable.is_some() => (false, unjudgeable),
            Some(_) if too_few => (
                false,
                Some(format!(
                    "the interval rests on {} bootstrap replicates; a gate on a confidence \
                     limit reads one of at least {MIN_GATE_REPLICATES} (--bootstrap)",
                    replicates.unwrap_or(0)
                )),
            ),
            None => (
                false,
                Some(match why {
                    Some(why) => format!("not defined on this dataset: {why}"),
                    None => "not in the report".to_owned(),
                }),
            ),
            Some(v) => {
                let low = c.min.filter(|&m| below(v, m));
                let high = c.max.filter(|&m| below(m, v));
                // A confidence limit is never more lenient than the estimate itself: an
                // interval that does not contain its estimate (a cluster bootstrap's lay
                // wholly above it: a red-team finding) cannot pass a gate the estimate fails.
                let estimate = metric
                    .and_then(|m| m.value)
                    .filter(|_| matches!(bound, "ci_lower" | "ci_upper"));
                let estimate_low = c.min.zip(estimate).filter(|&(m, e)| below(e, m));
                let estimate_high = c.max.zip(estimate).filter(|&(m, e)| below(m, e));
                match (low, high, estimate_low, estimate_high) {
                    (Some(m), ..) => (
                        false,
                        Some(format!("{} is below the minimum {m}", shown(v, m))),
                    ),
                    (_, Some(m), ..) => (
                        false,
                        Some(format!("{} is above the maximum {m}", shown(v, m))),
                    ),
                    (_, _, Some((m, e)), _) => (
                        false,
                        Some(format!(
                            "the estimate {e:.4} is below the minimum {m} (its interval's limit \
                             {v:.4} is not: the interval does not contain the estimate)"
                        )),
                    ),
                    (_, _, _, Some((m, e))) => (
                        false,
                        Some(format!(
                            "the estimate {e:.4} is above the maximum {m} (its interval's limit \
                             {v:.4} is not: the interval does not contain the estimate)"
                        )),
                    ),
                    _ => (true, None),
                }
            }
        };
        CriterionResult {
            criterion: c.label(),
            metric: c.metric.clone(),
            threshold: c.threshold.clone(),
            bound,
            min: c.min,
            max: c.max,
            observed,
            passed,
            reason,
            description: c.description,
        }
    });
    let criteria: Vec<CriterionResult> = sample.into_iter().chain(declared).collect();
    GateResult {
        passed: criteria.iter().all(|c| c.passed),
        criteria,
    }
}

#[cfg(test)]
mod tests {
    use nightingale_models::manifest::GateBound;

    use super::*;
    use crate::bootstrap::BootstrapCi;
    use crate::report::{self, NamedThreshold, Settings};

    fn criterion(
        metric: &str,
        bound: GateBound,
        min: Option<f64>,
        max: Option<f64>,
    ) -> GateCriterion {
        GateCriterion {
            metric: metric.to_owned(),
            threshold: None,
            bound,
            min,
            max,
            versions: Vec::new(),
            description: String::new(),
        }
    }

    /// wdbc-malignancy@2's gate: AUROC's DeLong lower limit, Brier, sensitivity at its
    /// screening threshold.
    fn wdbc_gate(min_positives: Option<u64>, min_negatives: Option<u64>) -> ValidationSpec {
        ValidationSpec {
            gate: vec![
                criterion("auroc", GateBound::CiLower, Some(0.9), None),
                criterion("brier", GateBound::Value, None, Some(0.1)),
                GateCriterion {
                    threshold: Some("screening".to_owned()),
                    ..criterion("sensitivity", GateBound::Value, Some(0.85), None)
                },
            ],
            min_positives,
            min_negatives,
            max_unusable_fraction: None,
        }
    }

    fn metrics_of(y: &[bool], p: &[f64]) -> Metrics {
        let thresholds = [NamedThreshold {
            name: "screening".to_owned(),
            value: 0.5,
            description: String::new(),
        }];
        let settings = Settings {
            bootstrap_replicates: 0,
            ..Settings::default()
        };
        report::compute_metrics(y, p, &thresholds, &settings, None, true)
    }

    fn by_name<'g>(g: &'g GateResult, name: &str) -> &'g CriterionResult {
        g.criteria
            .iter()
            .find(|c| c.criterion == name)
            .unwrap_or_else(|| panic!("no criterion {name} in {g:?}"))
    }

    /// Rows clustered by patient: the minimum-sample rule counts patients, and the AUROC
    /// limit the gate reads is the cluster bootstrap's, never DeLong's row-level one. The
    /// red-team's repro: 114 rows of one patient passed with DeLong's [0.982, 1].
    #[test]
    fn rows_of_few_patients_do_not_pass_the_gate() {
        let y: Vec<bool> = (0..114).map(|i| i % 3 == 0).collect();
        // Well separated, a few negatives scored among the positives (a DeLong interval of
        // non-zero width).
        let p: Vec<f64> = (0..114)
            .map(|i| match (i % 3 == 0, i % 19 == 1) {
                (true, _) => 0.6 + f64::from(i % 7) / 20.0,
                (false, true) => 0.7,
                (false, false) => 0.05 + f64::from(i % 11) / 40.0,
            })
            .collect();
        let thresholds = [NamedThreshold {
            name: "screening".to_owned(),
            value: 0.5,
            description: String::new(),
        }];
        let evaluate = |patients: usize, bootstrap: usize| {
            let clusters: Vec<String> = (0..114).map(|i| format!("p{}", i % patients)).collect();
            let settings = Settings {
                bootstrap_replicates: bootstrap,
                ..Settings::default()
            };
            let scored = report::Scored {
                y: &y,
                p: &p,
                subgroups: &[],
                clusters: Some(&clusters),
            };
            report::evaluate(&scored, &thresholds, &settings).0
        };
        // Unclustered, these rows pass.
        assert!(
            check(
                &wdbc_gate(None, None),
                Some(2),
                &metrics_of(&y, &p),
                &Settings::default()
            )
            .passed
        );
        // Red-team finding: a gate on a confidence limit, or on the ECE, is read at the
        // usual settings only: a report at another confidence level or bin count fails
        // those criteria (a 51 % interval and one bin passed gates that fail at 95 % and
        // ten).
        let mut with_ece = wdbc_gate(None, None);
        with_ece
            .gate
            .push(criterion("ece", GateBound::Value, None, Some(1.0)));
        let loose = Settings {
            confidence: 0.51,
            calibration_bins: 1,
            ..Settings::default()
        };
        let g = check(&with_ece, Some(2), &metrics_of(&y, &p), &loose);
        assert!(!g.passed);
        assert!(
            by_name(&g, "auroc.ci_lower")
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("51 %") && r.contains("--confidence 0.95")),
            "{g:?}"
        );
        assert!(
            by_name(&g, "ece")
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("over 1 bins") && r.contains("--calibration-bins 10")),
            "{g:?}"
        );
        assert!(by_name(&g, "brier").passed);
        assert!(
            check(
                &with_ece,
                Some(2),
                &metrics_of(&y, &p),
                &Settings::default()
            )
            .passed
        );

        // One patient: 1 positive and 1 negative patient, short of 10 of each.
        let one = evaluate(1, 0);
        assert_eq!(
            one.patients,
            Some(report::PatientCounts {
                n: 1,
                positives: 1,
                negatives: 1
            })
        );
        let g = check(&wdbc_gate(None, None), Some(2), &one, &Settings::default());
        assert!(!g.passed);
        assert_eq!(
            by_name(&g, "min_positives").reason.as_deref(),
            Some("needs at least 10 positive patients, has 1")
        );
        // No bootstrap: no interval at all (DeLong's is row-level), so the limit fails.
        assert_eq!(one.auroc.ci_lower, None);
        assert_eq!(
            one.auroc.ci_undefined.as_deref(),
            Some(report::CLUSTERED_ROWS)
        );
        assert!(!by_name(&g, "auroc.ci_lower").passed);
        let sens = &one.operating_points[0].sensitivity;
        assert!(sens.ci_lower.is_none() && sens.value.is_some());

        // Enough patients, with the cluster bootstrap: its interval is the one read.
        let many = evaluate(57, 200);
        assert_eq!(many.patients.map(|p| p.n), Some(57));
        assert_eq!(many.auroc.ci_method, Some("bootstrap-percentile"));
        let boot = many.auroc.bootstrap.unwrap();
        assert_eq!(many.auroc.ci_lower, Some(boot.ci_lower));
        let g = check(&wdbc_gate(None, None), Some(2), &many, &Settings::default());
        assert!(by_name(&g, "min_positives").passed, "{g:?}");
        // 200 replicates: too few for a gate to read the interval's limit.
        let limit = by_name(&g, "auroc.ci_lower");
        assert!(!limit.passed);
        assert_eq!(
            limit.reason.as_deref(),
            Some(
                "the interval rests on 200 bootstrap replicates; a gate on a confidence limit \
                 reads one of at least 1000 (--bootstrap)"
            )
        );
        // One replicate (a review's repro: a single resample "interval" of zero width passed
        // the floor with a chosen seed) fails the same way.
        let mut one = many.clone();
        one.auroc.bootstrap = Some(BootstrapCi {
            ci_lower: 0.99,
            ci_upper: 0.99,
            replicates: 1,
            replicates_skipped: 0,
        });
        one.auroc.ci_lower = Some(0.99);
        one.auroc.ci_upper = Some(0.99);
        assert!(
            !by_name(
                &check(&wdbc_gate(None, None), Some(2), &one, &Settings::default()),
                "auroc.ci_lower"
            )
            .passed
        );
        // Enough of them: the limit is read.
        let mut enough = one.clone();
        if let Some(b) = enough.auroc.bootstrap.as_mut() {
            b.replicates = MIN_GATE_REPLICATES;
        }
        assert!(
            by_name(
                &check(
                    &wdbc_gate(None, None),
                    Some(2),
                    &enough,
                    &Settings::default()
                ),
                "auroc.ci_lower"
            )
            .passed
        );
        // An interval above its own estimate (a cluster bootstrap's could lie there): the
        // estimate below the minimum fails the criterion whose limit passes.
        let mut above = enough.clone();
        above.auroc.value = Some(0.85);
        let g = check(
            &wdbc_gate(None, None),
            Some(2),
            &above,
            &Settings::default(),
        );
        let limit = by_name(&g, "auroc.ci_lower");
        assert!(
            !limit.passed
                && limit
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("the estimate 0.8500 is below the minimum 0.9")),
            "{limit:?}"
        );
    }

    /// The review's repro: two malignant and two benign rows ranked perfectly passed every
    /// criterion (AUROC 1 with DeLong interval [1, 1], Brier 0.025, sensitivity 2/2).
    #[test]
    fn four_rows_ranked_perfectly_do_not_pass_the_gate() {
        let m = metrics_of(&[true, true, false, false], &[0.9, 0.8, 0.1, 0.2]);
        assert_eq!(m.auroc.value, Some(1.0));
        let g = check(&wdbc_gate(None, None), Some(2), &m, &Settings::default());
        assert!(!g.passed, "{g:?}");
        let names: Vec<&str> = g.criteria.iter().map(|c| c.criterion.as_str()).collect();
        assert_eq!(
            names,
            [
                "min_positives",
                "min_negatives",
                "auroc.ci_lower",
                "brier",
                "sensitivity@screening"
            ]
        );
        let pos = by_name(&g, "min_positives");
        assert!(!pos.passed);
        assert_eq!((pos.observed, pos.min), (Some(2.0), Some(10.0)));
        assert_eq!(
            pos.reason.as_deref(),
            Some("needs at least 10 positive rows, has 2")
        );
        assert_eq!(
            by_name(&g, "min_negatives").reason.as_deref(),
            Some("needs at least 10 negative rows, has 2")
        );
        // the zero-width interval is not reported, so its floor fails as undefined
        let auroc = by_name(&g, "auroc.ci_lower");
        assert!(!auroc.passed && auroc.observed.is_none());
        let why = auroc.reason.as_deref().unwrap();
        assert!(
            why.starts_with("not defined on this dataset: DeLong's variance is 0"),
            "{why}"
        );
        // the criteria that are met on these rows still say so
        assert!(by_name(&g, "brier").passed && by_name(&g, "sensitivity@screening").passed);
    }

    /// A percentile bootstrap interval of zero width is not reported either: 60 perfectly
    /// ranked rows (above every minimum) with 1000 replicates gave AUPRC [1, 1], and a
    /// floor on its `ci_lower` passed on no evidence. The replicates' interval stays in the
    /// metric's `bootstrap` block; a bootstrap interval with width is the metric's interval.
    #[test]
    fn a_zero_width_bootstrap_interval_is_not_evidence() {
        let y: Vec<bool> = (0..60).map(|i| i < 30).collect();
        let perfect: Vec<f64> = (0..60).map(|i| 1.0 - f64::from(i) / 100.0).collect();
        let settings = Settings::default();
        let spec = crate::bootstrap::BootstrapSpec {
            replicates: 1000,
            seed: 1,
            confidence: 0.95,
            stop: None,
        };
        let thresholds = [NamedThreshold {
            name: "screening".to_owned(),
            value: 0.5,
            description: String::new(),
        }];
        let boot = crate::bootstrap::bootstrap(&y, &perfect, None, spec.clone());
        let m = report::compute_metrics(&y, &perfect, &thresholds, &settings, Some(&boot), true);
        assert!((m.auprc.value.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(
            (m.auprc.ci_lower, m.auprc.ci_upper, m.auprc.ci_method),
            (None, None, None)
        );
        assert_eq!(
            m.auprc.ci_undefined.as_deref(),
            Some(report::BOOTSTRAP_DEGENERATE)
        );
        let kept = m.auprc.bootstrap.unwrap();
        assert!((kept.ci_lower - 1.0).abs() < 1e-12 && (kept.ci_upper - 1.0).abs() < 1e-12);
        assert_eq!(kept.replicates, 1000);
        let spec_auprc = ValidationSpec {
            gate: vec![criterion("auprc", GateBound::CiLower, Some(0.9), None)],
            ..wdbc_gate(None, None)
        };
        let g = check(&spec_auprc, Some(2), &m, &settings);
        let c = by_name(&g, "auprc.ci_lower");
        assert!(!c.passed && c.observed.is_none());
        assert!(
            c.reason
                .as_deref()
                .unwrap()
                .contains("every bootstrap replicate gave the same value"),
            "{c:?}"
        );
        // Imperfect scores: the replicates vary, and their interval is the metric's.
        let noisy: Vec<f64> = (0..60).map(|i| f64::from((i * 37) % 61) / 61.0).collect();
        let boot = crate::bootstrap::bootstrap(&y, &noisy, None, spec);
        let m = report::compute_metrics(&y, &noisy, &thresholds, &settings, Some(&boot), true);
        let ci = m.auprc.bootstrap.unwrap();
        assert!(ci.ci_lower < ci.ci_upper);
        assert_eq!(
            (m.auprc.ci_lower, m.auprc.ci_upper),
            (Some(ci.ci_lower), Some(ci.ci_upper))
        );
        assert_eq!(m.auprc.ci_method, Some("bootstrap-percentile"));
        assert!(m.auprc.ci_undefined.is_none());
    }

    /// Lowering the minimums (as a bundle may, down to 2) does not let a zero-width interval
    /// through: the two guards are independent.
    #[test]
    fn a_zero_width_interval_fails_even_when_the_minimums_are_met() {
        let m = metrics_of(&[true, true, false, false], &[0.9, 0.8, 0.1, 0.2]);
        let g = check(
            &wdbc_gate(Some(2), Some(2)),
            Some(2),
            &m,
            &Settings::default(),
        );
        assert!(!g.passed);
        let failed: Vec<&str> = g
            .criteria
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.criterion.as_str())
            .collect();
        assert_eq!(failed, ["auroc.ci_lower"]);
        let pos = by_name(&g, "min_positives");
        assert_eq!(pos.description, "[validation] min_positives of the bundle");
        // in report.json: a value, no interval, and why
        let json = serde_json::to_value(&m.auroc).unwrap();
        assert_eq!(json["value"], 1.0);
        assert!(json.get("ci_lower").is_none() && json.get("standard_error").is_none());
        assert!(
            json["ci_undefined"]
                .as_str()
                .unwrap()
                .contains("zero width")
        );
    }

    /// One positive: the AUROC is a point estimate and its missing interval says why.
    #[test]
    fn one_positive_row_has_no_interval_and_says_why() {
        let m = metrics_of(&[true, false, false], &[0.9, 0.1, 0.2]);
        let g = check(&wdbc_gate(Some(2), Some(2)), None, &m, &Settings::default());
        let auroc = by_name(&g, "auroc.ci_lower");
        assert!(!auroc.passed);
        assert!(
            auroc
                .reason
                .as_deref()
                .unwrap()
                .contains("at least two rows of each class"),
            "{auroc:?}"
        );
        assert!(!by_name(&g, "min_positives").passed);
    }

    /// 40 positives and 60 negatives, well but not perfectly ranked: every criterion passes,
    /// the minimum-sample rule with them.
    #[test]
    fn enough_rows_ranked_well_pass_the_gate() {
        let mut y = Vec::new();
        let mut p = Vec::new();
        for i in 0..40 {
            y.push(true);
            // two positives scored low, among the negatives
            p.push(if i < 2 {
                0.2
            } else {
                0.95 - 0.005 * f64::from(i)
            });
        }
        for j in 0..60 {
            y.push(false);
            // one negative scored high, among the positives
            p.push(if j == 0 {
                0.8
            } else {
                0.05 + 0.004 * f64::from(j)
            });
        }
        let m = metrics_of(&y, &p);
        let g = check(&wdbc_gate(None, None), Some(2), &m, &Settings::default());
        assert!(g.passed, "{g:?}");
        assert_eq!(by_name(&g, "min_positives").observed, Some(40.0));
        assert_eq!(by_name(&g, "min_negatives").observed, Some(60.0));
        assert_eq!(
            by_name(&g, "min_negatives").description,
            "default min_negatives (docs/validation.md)"
        );
        let lower = by_name(&g, "auroc.ci_lower").observed.unwrap();
        assert!(lower >= 0.9 && lower < m.auroc.value.unwrap(), "{lower}");
        assert!(g.criteria.iter().all(|c| c.reason.is_none()));
    }

    /// A metric at its limit passes though rounding put it a hair beyond (a review: a
    /// Brier score of exactly 0.09, computed as 0.09000000000000005, failed `max = 0.09`);
    /// one beyond it by more than rounding fails.
    #[test]
    fn a_metric_at_its_limit_passes_whatever_the_rounding() {
        let y: Vec<bool> = (0..20).map(|i| i < 10).collect();
        let p: Vec<f64> = y.iter().map(|&t| if t { 0.7 } else { 0.3 }).collect();
        let m = metrics_of(&y, &p);
        let brier = m.brier.value.unwrap();
        assert!((brier - 0.09).abs() < 1e-15, "{brier}");
        let gate = |max: f64| ValidationSpec {
            gate: vec![criterion("brier", GateBound::Value, None, Some(max))],
            min_positives: Some(2),
            min_negatives: Some(2),
            max_unusable_fraction: None,
        };
        let g = check(&gate(0.09), Some(1), &m, &Settings::default());
        assert!(by_name(&g, "brier").passed, "{g:?}");
        let g = check(&gate(0.0899), Some(1), &m, &Settings::default());
        assert!(!by_name(&g, "brier").passed, "{g:?}");
        // a value that four decimals would show as its limit is shown whole
        assert_eq!(shown(0.090003, 0.09), "0.090003");
        assert_eq!(shown(0.0912, 0.09), "0.0912");
        assert!(!below(0.3 - 1e-16, 0.3) && below(0.2999, 0.3));
    }

    /// Multi-class: the smallest class is held to `min_positives` (one absent from the
    /// dataset has none: a gate passed on 2 of 8 classes, a review's finding), the rows
    /// outside the largest to `min_negatives`.
    #[test]
    fn multiclass_minimums_name_the_class_that_is_short() {
        let labels: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        // 12 of a, 12 of b, 3 of c, none of d
        let y: Vec<usize> = (0..27)
            .map(|i| {
                if i < 12 {
                    0
                } else if i < 24 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let p: Vec<f64> = y
            .iter()
            .flat_map(|&t| (0..4).map(move |k| if k == t { 0.7 } else { 0.1 }))
            .collect();
        let m = crate::multiclass::evaluate(&y, &p, &labels, 0.95, None, None);
        let spec = ValidationSpec {
            gate: vec![criterion("brier", GateBound::Value, None, Some(0.5))],
            min_positives: None,
            min_negatives: None,
            max_unusable_fraction: None,
        };
        let g = check_multiclass(&spec, None, &m, &Settings::default());
        assert!(!g.passed);
        let pos = by_name(&g, "min_positives");
        assert_eq!(pos.observed, Some(0.0));
        assert_eq!(
            pos.reason.as_deref(),
            Some("needs at least 10 rows of each class, class \"d\" has 0")
        );
        // 27 rows, 12 of the largest class: 15 outside it
        let neg = by_name(&g, "min_negatives");
        assert!(neg.passed && neg.observed == Some(15.0), "{neg:?}");
        assert!(by_name(&g, "brier").passed);
    }

    /// Multi-class rows clustered by patient: the rule counts patients (a red-team finding:
    /// with rows counted, a gate passed on three patients' rows), and the AUROC limit it reads
    /// is the cluster bootstrap's.
    #[test]
    fn multiclass_rows_of_few_patients_do_not_pass_the_gate() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        // 120 rows, 40 of each class; the true class scored higher, with overlap.
        let y: Vec<usize> = (0..120).map(|i| i % 3).collect();
        let p: Vec<f64> = y
            .iter()
            .enumerate()
            .flat_map(|(i, &t)| {
                (0..3).map(move |k| {
                    ((i * 31 + k * 17) % 23) as f64 / 46.0 + if k == t { 0.3 } else { 0.0 }
                })
            })
            .collect();
        let spec = ValidationSpec {
            gate: vec![criterion("auroc", GateBound::CiLower, Some(0.5), None)],
            min_positives: None,
            min_negatives: None,
            max_unusable_fraction: None,
        };
        let boot = || {
            Some(crate::bootstrap::BootstrapSpec {
                replicates: MIN_GATE_REPLICATES,
                seed: 1,
                confidence: GATE_CONFIDENCE,
                stop: None,
            })
        };
        // Every row its own patient: passes.
        let rows: Vec<usize> = (0..120).collect();
        let m = crate::multiclass::evaluate(&y, &p, &labels, 0.95, boot(), Some((&rows, 120)));
        let g = check_multiclass(&spec, None, &m, &Settings::default());
        assert!(g.passed, "{g:?}");
        assert_eq!(m.patients, Some(120));
        assert_eq!(m.classes[0].patients, Some(40));
        assert_eq!(m.classes[0].patients_outside, Some(80));
        // Three patients (each with rows of every class): short of 10 patients per class.
        let three: Vec<usize> = (0..120).map(|i| i / 40).collect();
        let m = crate::multiclass::evaluate(&y, &p, &labels, 0.95, boot(), Some((&three, 3)));
        assert_eq!(m.patients, Some(3));
        assert_eq!(m.classes[1].patients, Some(3));
        assert_eq!(m.classes[1].patients_outside, Some(3));
        // Row-level intervals are gone; the macro AUROC's is the cluster bootstrap's.
        assert!(m.accuracy.ci_lower.is_none());
        assert!(
            m.accuracy
                .ci_undefined
                .as_deref()
                .unwrap()
                .contains("clustered by patient")
        );
        assert!(m.classes[0].auroc.ci_lower.is_none());
        assert_eq!(m.auroc.ci_method, Some("bootstrap-percentile"));
        let g = check_multiclass(&spec, None, &m, &Settings::default());
        assert!(!g.passed);
        let pos = by_name(&g, "min_positives");
        assert_eq!(
            pos.reason.as_deref(),
            Some("needs at least 10 patients of each class, class \"a\" has 3")
        );
        assert!(!by_name(&g, "min_negatives").passed);
    }

    /// Red-team finding: 76 of 114 rows unusable and the gate passed on the other 38. At
    /// most a tenth by default, or the bundle's share.
    #[test]
    fn too_many_unusable_rows_fail_the_gate() {
        let spec = ValidationSpec::default();
        let ok = unusable_rows(&spec, 110, 4);
        assert!(ok.passed && ok.reason.is_none(), "{ok:?}");
        let edge = unusable_rows(&spec, 90, 10);
        assert!(edge.passed, "{edge:?}");
        let bad = unusable_rows(&spec, 38, 76);
        assert!(!bad.passed);
        assert_eq!(
            bad.reason.as_deref(),
            Some(
                "76 of the 114 rows read were unusable (66.7 %, at most 10.0 %): the metrics describe the other rows only"
            )
        );
        assert_eq!(bad.max, Some(0.1));
        let lenient = ValidationSpec {
            max_unusable_fraction: Some(0.7),
            ..ValidationSpec::default()
        };
        assert!(unusable_rows(&lenient, 38, 76).passed);
        assert!(unusable_rows(&spec, 0, 0).passed);
    }
}
