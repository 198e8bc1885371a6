//! The deployment gate: a bundle's `[[validation.gate]]` criteria checked against a report.

use nightingale_models::manifest::{GateCriterion, ValidationSpec};
use serde::Serialize;

use crate::multiclass::MulticlassMetrics;
use crate::report::{Metric, Metrics};

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

/// Checks each criterion that holds for `version` against a binary report; a metric the
/// report does not define fails its criterion.
pub fn check(spec: &ValidationSpec, version: Option<u64>, metrics: &Metrics) -> GateResult {
    check_with(spec, version, |c| find(metrics, c))
}

/// Checks against a multi-class report: `auroc`, `auprc` (macro means) and `brier`; a
/// criterion on any other metric fails ("not in the report").
pub fn check_multiclass(
    spec: &ValidationSpec,
    version: Option<u64>,
    m: &MulticlassMetrics,
) -> GateResult {
    check_with(spec, version, |c| match (c.metric.as_str(), &c.threshold) {
        ("auroc", None) => Some(&m.auroc),
        ("auprc", None) => Some(&m.auprc),
        ("brier", None) => Some(&m.brier),
        _ => None,
    })
}

fn check_with<'m>(
    spec: &ValidationSpec,
    version: Option<u64>,
    find: impl Fn(&GateCriterion) -> Option<&'m Metric>,
) -> GateResult {
    let criteria: Vec<CriterionResult> = spec
        .gate_for(version)
        .iter()
        .map(|c| {
            let bound = c.bound.as_str();
            let metric = find(c);
            let observed = metric.and_then(|m| m.get(bound));
            let (passed, reason) = match observed {
                None => (
                    false,
                    Some(match metric.and_then(|m| m.undefined.clone()) {
                        Some(why) => format!("not defined on this dataset: {why}"),
                        None => "not in the report".to_owned(),
                    }),
                ),
                Some(v) => {
                    let low = c.min.filter(|&m| v < m);
                    let high = c.max.filter(|&m| v > m);
                    match (low, high) {
                        (Some(m), _) => (false, Some(format!("{v:.4} is below the minimum {m}"))),
                        (_, Some(m)) => (false, Some(format!("{v:.4} is above the maximum {m}"))),
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
                description: c.description.clone(),
            }
        })
        .collect();
    GateResult {
        passed: criteria.iter().all(|c| c.passed),
        criteria,
    }
}
