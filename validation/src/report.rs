//! The report: every metric of a labelled dataset's predictions, with its interval and n, as
//! `report.json` (schema in `docs/validation.md`) and the input of `report.html`.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::bootstrap::{self, BootstrapCi, BootstrapSpec};
use crate::dataset::{DatasetSummary, Unusable};
use crate::gate::GateResult;
use crate::metrics::{
    self, Confusion, DecisionPoint, PairedDeLong, PrPoint, Proportion, Reliability, RocPoint,
};
use crate::multiclass::MulticlassMetrics;

/// The `schema` field of every report this version writes.
pub const SCHEMA: &str = "nightingale.validation.report/1";

/// How the numbers are computed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Confidence level of every interval (0.95).
    pub confidence: f64,
    /// Bootstrap replicates (0: no bootstrap).
    pub bootstrap_replicates: usize,
    pub seed: u64,
    /// Subgroups with fewer rows (or without both classes) are reported as insufficient.
    pub min_subgroup_n: usize,
    pub calibration_bins: usize,
    /// Operating points chosen on this dataset for these sensitivities / specificities.
    pub target_sensitivities: Vec<f64>,
    pub target_specificities: Vec<f64>,
    /// Threshold probabilities of the decision curve.
    pub decision_thresholds: Vec<f64>,
    /// Set, the bootstrap stops ([`crate::bootstrap::BootstrapSpec::stop`]): not a setting
    /// of the numbers, the run's cancellation.
    #[serde(skip)]
    pub stop: Option<crate::bootstrap::Stop>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            confidence: 0.95,
            bootstrap_replicates: 2000,
            seed: 20_261_202,
            min_subgroup_n: 30,
            calibration_bins: 10,
            target_sensitivities: vec![0.90, 0.95],
            target_specificities: vec![0.90, 0.95],
            decision_thresholds: (1..100).map(|i| f64::from(i) / 100.0).collect(),
            stop: None,
        }
    }
}

/// A declared operating point (a bundle's `[[thresholds]]` entry on the scored label).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NamedThreshold {
    pub name: String,
    pub value: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// One number with its interval: the shape of every metric in `report.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metric {
    /// `null` when the metric is not defined on these rows (see `undefined`).
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci_lower: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci_upper: Option<f64>,
    /// How the interval was computed: `delong`, `wilson`, `bootstrap-percentile`, `wald`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci_method: Option<&'static str>,
    /// Rows (or, for proportions, the denominator) behind the number.
    pub n: usize,
    /// Numerator of a proportion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standard_error: Option<f64>,
    /// The percentile bootstrap interval, where one was computed besides the main one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapCi>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undefined: Option<String>,
    /// Why a metric with a value has no interval where it would have one: a zero-width
    /// interval is left out rather than reported (`ci_lower` and `ci_upper` absent), so that
    /// a gate on a confidence limit fails instead of passing on no evidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci_undefined: Option<String>,
}

/// `ci_undefined` of an AUROC whose DeLong variance is zero (see [`metrics::delong`]).
pub const DELONG_DEGENERATE: &str = "DeLong's variance is 0: every positive outranks the same \
     share of negatives and every negative the same share of positives (an AUROC of 0 or 1, or \
     each class's scores tied), so the interval would have zero width, which is not evidence";

/// `ci_undefined` of a metric whose percentile bootstrap interval has zero width.
pub const BOOTSTRAP_DEGENERATE: &str = "every bootstrap replicate gave the same value (a \
     perfect ranking, or scores that cannot move), so the percentile interval would have zero \
     width, which is not evidence";

/// An interval at most this wide has no width ([`Metric::set_bootstrap_interval`]): a real
/// percentile interval of a metric on [0, 1] is never within 1e-12.
const ZERO_WIDTH: f64 = 1e-12;

impl Metric {
    /// Makes the percentile bootstrap interval `ci` the metric's interval, unless it has zero
    /// width: the metric then keeps its value and no interval, and `ci_undefined` says why
    /// (as for a degenerate DeLong interval), so that a gate on a confidence limit fails
    /// rather than passes on no evidence. `bootstrap` keeps the replicates' interval as it is.
    pub(crate) fn set_bootstrap_interval(&mut self, ci: BootstrapCi) {
        self.bootstrap = Some(ci);
        self.standard_error = None;
        // Rounding may leave replicates of one value a few ulps apart (an AUPRC of 1 summed
        // as 0.9999999999999999 in some, 1 in others): that is no width either.
        if ci.ci_upper - ci.ci_lower <= ZERO_WIDTH {
            self.ci_lower = None;
            self.ci_upper = None;
            self.ci_method = None;
            self.ci_undefined = Some(BOOTSTRAP_DEGENERATE.to_owned());
        } else {
            self.ci_lower = Some(ci.ci_lower);
            self.ci_upper = Some(ci.ci_upper);
            self.ci_method = Some("bootstrap-percentile");
            self.ci_undefined = None;
        }
    }

    /// AUROC with its DeLong interval (the point estimate alone with fewer than two rows of
    /// a class, or, with `ci_undefined`, when DeLong's variance is degenerate; `why` when it
    /// is not defined at all).
    pub(crate) fn auroc(y: &[bool], p: &[f64], confidence: f64, why: &str) -> Metric {
        let n = y.len();
        match metrics::delong(y, p, confidence) {
            Some(d) if d.ci_lower.is_none() => Metric {
                value: Some(d.auc),
                n,
                ci_undefined: Some(DELONG_DEGENERATE.to_owned()),
                ..Metric::default()
            },
            Some(d) => Metric {
                value: Some(d.auc),
                ci_lower: d.ci_lower,
                ci_upper: d.ci_upper,
                ci_method: Some("delong"),
                n,
                standard_error: Some(d.variance.sqrt()),
                ..Metric::default()
            },
            None => {
                let mut m = Metric::point(metrics::auroc(y, p), n, why);
                if m.value.is_some() {
                    m.ci_undefined =
                        Some("DeLong's interval needs at least two rows of each class".to_owned());
                }
                m
            }
        }
    }

    pub(crate) fn undefined(n: usize, why: &str) -> Metric {
        Metric {
            n,
            undefined: Some(why.to_owned()),
            ..Metric::default()
        }
    }
    pub(crate) fn point(value: Option<f64>, n: usize, why: &str) -> Metric {
        match value {
            Some(v) => Metric {
                value: Some(v),
                n,
                ..Metric::default()
            },
            None => Metric::undefined(n, why),
        }
    }
    pub(crate) fn proportion(p: Option<Proportion>, why: &str) -> Metric {
        match p {
            Some(p) => Metric {
                value: Some(p.value),
                ci_lower: Some(p.ci_lower),
                ci_upper: Some(p.ci_upper),
                ci_method: Some("wilson"),
                n: p.n,
                k: Some(p.k),
                ..Metric::default()
            },
            None => Metric::undefined(0, why),
        }
    }
    /// The value, `ci_lower` or `ci_upper`, as a gate reads it.
    pub fn get(&self, bound: &str) -> Option<f64> {
        match bound {
            "value" => self.value,
            "ci_lower" => self.ci_lower,
            "ci_upper" => self.ci_upper,
            _ => None,
        }
    }
}

/// The metrics at one threshold.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OperatingPoint {
    pub name: String,
    /// `bundle` (declared in bundle.toml) or `target-sensitivity` / `target-specificity`
    /// (chosen on this dataset: optimistic, for orientation only).
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    pub threshold: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub confusion: Confusion,
    pub sensitivity: Metric,
    pub specificity: Metric,
    pub ppv: Metric,
    pub npv: Metric,
    pub accuracy: Metric,
    pub f1: Metric,
}

impl OperatingPoint {
    #[allow(clippy::too_many_arguments)]
    fn at(
        name: String,
        source: &'static str,
        target: Option<f64>,
        threshold: f64,
        description: String,
        y: &[bool],
        p: &[f64],
        confidence: f64,
    ) -> OperatingPoint {
        let c = metrics::confusion(y, p, threshold);
        OperatingPoint {
            name,
            source,
            target,
            threshold,
            description,
            sensitivity: Metric::proportion(c.sensitivity(confidence), "no positives"),
            specificity: Metric::proportion(c.specificity(confidence), "no negatives"),
            ppv: Metric::proportion(c.ppv(confidence), "no row at or above the threshold"),
            npv: Metric::proportion(c.npv(confidence), "no row below the threshold"),
            accuracy: Metric::proportion(c.accuracy(confidence), "no rows"),
            f1: Metric::point(c.f1(), c.n(), "no positives and no positive calls"),
            confusion: c,
        }
    }

    /// A metric by its gate name.
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        Some(match name {
            "sensitivity" => &self.sensitivity,
            "specificity" => &self.specificity,
            "ppv" => &self.ppv,
            "npv" => &self.npv,
            "accuracy" => &self.accuracy,
            "f1" => &self.f1,
            _ => return None,
        })
    }
}

/// The metrics of a set of rows (the whole dataset, or a subgroup).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metrics {
    pub n: usize,
    pub positives: usize,
    pub negatives: usize,
    /// With `--patient-id-column`: the patients behind the rows (the deployment gate's
    /// minimum-sample rule counts these, not rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patients: Option<PatientCounts>,
    pub prevalence: Metric,
    pub auroc: Metric,
    pub auprc: Metric,
    pub brier: Metric,
    pub calibration_intercept: Metric,
    pub calibration_slope: Metric,
    pub ece: Metric,
    /// The largest |observed − predicted| over the reliability bins.
    pub mce: Metric,
    pub operating_points: Vec<OperatingPoint>,
}

/// Distinct patients (values of the patient-id column): all, with a positive row, with a
/// negative row.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PatientCounts {
    pub n: usize,
    pub positives: usize,
    pub negatives: usize,
}

/// `ci_undefined` of a row-level interval on rows clustered by patient.
pub const CLUSTERED_ROWS: &str = "rows are clustered by patient (--patient-id-column): an \
interval that takes rows as independent would be too narrow; only the cluster bootstrap's is \
reported (--bootstrap > 0, for AUROC, AUPRC and Brier)";

/// `ci_undefined` of a row-level interval of a multi-class report on rows clustered by
/// patient.
pub const CLUSTERED_ROWS_MULTICLASS: &str = "rows are clustered by patient \
(--patient-id-column): an interval that takes rows as independent would be too narrow; only \
the cluster bootstrap's is reported (--bootstrap > 0, for the macro AUROC)";

impl Metric {
    /// Drops a row-level interval (rows clustered by patient), saying why.
    pub(crate) fn without_row_interval(&mut self, why: &str) {
        if self.ci_method == Some("bootstrap-percentile") {
            return;
        }
        if self.ci_lower.is_some() || self.ci_upper.is_some() {
            self.ci_lower = None;
            self.ci_upper = None;
            self.ci_method = None;
            self.standard_error = None;
            self.ci_undefined = Some(why.to_owned());
        }
    }
}

impl Metrics {
    /// Rows clustered by patient (`clusters[i]` is row i's patient, of `n_clusters`): the
    /// patients are counted, a bootstrap interval (the cluster bootstrap's, when there is
    /// one) becomes the main interval, and every interval that takes rows as independent
    /// (DeLong, Wilson, Wald) is dropped with [`CLUSTERED_ROWS`], so that a gate on a
    /// confidence limit cannot pass on the narrower row-level one.
    fn clustered(&mut self, y: &[bool], clusters: &[usize], n_clusters: usize) {
        let mut pos = vec![false; n_clusters];
        let mut neg = vec![false; n_clusters];
        for (&label, &c) in y.iter().zip(clusters) {
            if label {
                pos[c] = true;
            } else {
                neg[c] = true;
            }
        }
        self.patients = Some(PatientCounts {
            n: pos.iter().zip(&neg).filter(|(p, n)| **p || **n).count(),
            positives: pos.iter().filter(|&&b| b).count(),
            negatives: neg.iter().filter(|&&b| b).count(),
        });
        if let Some(ci) = self.auroc.bootstrap {
            self.auroc.set_bootstrap_interval(ci);
        }
        for m in [
            &mut self.prevalence,
            &mut self.auroc,
            &mut self.auprc,
            &mut self.brier,
            &mut self.calibration_intercept,
            &mut self.calibration_slope,
            &mut self.ece,
            &mut self.mce,
        ] {
            m.without_row_interval(CLUSTERED_ROWS);
        }
        for op in &mut self.operating_points {
            for m in [
                &mut op.sensitivity,
                &mut op.specificity,
                &mut op.ppv,
                &mut op.npv,
                &mut op.accuracy,
                &mut op.f1,
            ] {
                m.without_row_interval(CLUSTERED_ROWS);
            }
        }
    }

    /// A threshold-free metric by its gate name.
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        Some(match name {
            "auroc" => &self.auroc,
            "auprc" => &self.auprc,
            "brier" => &self.brier,
            "calibration_intercept" => &self.calibration_intercept,
            "calibration_slope" => &self.calibration_slope,
            "ece" => &self.ece,
            _ => return None,
        })
    }
}

/// Curves and tables drawn in the HTML report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Curves {
    /// At most 500 points, evenly spaced along the curve.
    pub roc: Vec<RocPoint>,
    /// Bootstrap band around the ROC curve (empty without bootstrap).
    pub roc_band: Vec<bootstrap::RocBandPoint>,
    pub precision_recall: Vec<PrPoint>,
    pub reliability: Option<Reliability>,
    pub decision: Vec<DecisionPoint>,
}

/// One subgroup's metrics, or why there are none.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subgroup {
    pub column: String,
    /// The cell value; an empty cell is `"(missing)"` (with `missing`), a column not
    /// analysed `"(not analysed)"` (with `not_analysed`): a cell that reads `(missing)` is
    /// told apart by those flags.
    pub value: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub missing: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub not_analysed: bool,
    pub n: usize,
    pub positives: usize,
    /// `ok` or `insufficient`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// A multi-class report's subgroup metrics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiclass: Option<MulticlassMetrics>,
}

/// Why a subgroup of `n` rows gets no metrics, if it does not.
/// With rows clustered by patient (`patients`: the subgroup's distinct patients), the
/// minimum counts patients (a subgroup of 59 rows from 2 patients got metrics: a red-team
/// finding), as the gate's minimum-sample rule does.
fn insufficient(
    n: usize,
    patients: Option<usize>,
    one_class: bool,
    settings: &Settings,
) -> Option<String> {
    if let Some(p) = patients.filter(|&p| p < settings.min_subgroup_n) {
        Some(format!(
            "{p} patients, fewer than the minimum of {} (rows clustered by patient)",
            settings.min_subgroup_n
        ))
    } else if n < settings.min_subgroup_n {
        Some(format!(
            "{n} rows, fewer than the minimum of {}",
            settings.min_subgroup_n
        ))
    } else if one_class {
        Some("only one class".to_owned())
    } else {
        None
    }
}

/// Most distinct values one subgroup column may hold: a fairness analysis compares a
/// handful of groups (sex, age band, site, scanner), and subgroups under
/// [`Settings::min_subgroup_n`] rows get no metrics anyway. A column with more (a free-text or
/// identifier column named by mistake) is reported as not analysed instead of one entry
/// per value: its values would otherwise be kept per row and written out whole, twice.
pub const MAX_SUBGROUP_VALUES: usize = 100;

/// Longest subgroup value, in bytes; a column with a longer one is not analysed.
pub const MAX_SUBGROUP_VALUE_BYTES: usize = 128;

/// One subgroup column of the scored rows: each row's value as an index into `values`, or
/// why the column is not analysed (then `rows` is empty).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SubgroupColumn {
    pub name: String,
    /// Its distinct values, in the order they were first seen.
    pub values: Vec<String>,
    /// Each row's value (an index into `values`).
    pub rows: Vec<u32>,
    pub refused: Option<String>,
}

impl SubgroupColumn {
    pub fn new(name: impl Into<String>) -> SubgroupColumn {
        SubgroupColumn {
            name: name.into(),
            ..SubgroupColumn::default()
        }
    }

    /// Adds the next row's value. Past [`MAX_SUBGROUP_VALUES`] distinct values or a value
    /// over [`MAX_SUBGROUP_VALUE_BYTES`], the column stops: what it held is let go and it is
    /// reported as not analysed (the reason never quotes a value).
    pub fn push(&mut self, value: &str) {
        if self.refused.is_some() {
            return;
        }
        let refuse = |c: &mut SubgroupColumn, why: String| {
            c.refused = Some(why);
            c.values = Vec::new();
            c.rows = Vec::new();
        };
        if value.len() > MAX_SUBGROUP_VALUE_BYTES {
            return refuse(
                self,
                format!("not analysed: a value is over {MAX_SUBGROUP_VALUE_BYTES} bytes"),
            );
        }
        // A linear search: at most MAX_SUBGROUP_VALUES short values.
        let code = match self.values.iter().position(|v| v == value) {
            Some(k) => k,
            None if self.values.len() >= MAX_SUBGROUP_VALUES => {
                return refuse(
                    self,
                    format!("not analysed: more than {MAX_SUBGROUP_VALUES} distinct values"),
                );
            }
            None => {
                self.values.push(value.to_owned());
                self.values.len() - 1
            }
        };
        self.rows.push(code as u32);
    }

    /// The rows of each value, values in ascending order; or the refusal as one entry.
    fn groups(&self) -> Result<Vec<(&str, Vec<usize>)>, &str> {
        if let Some(why) = &self.refused {
            return Err(why);
        }
        let mut by_code: Vec<Vec<usize>> = vec![Vec::new(); self.values.len()];
        for (i, &c) in self.rows.iter().enumerate() {
            by_code[c as usize].push(i);
        }
        let mut groups: Vec<(&str, Vec<usize>)> = self
            .values
            .iter()
            .map(String::as_str)
            .zip(by_code)
            .collect();
        groups.sort_by(|a, b| a.0.cmp(b.0));
        Ok(groups)
    }

    /// The entry a column that is not analysed gets in the report.
    fn not_analysed(&self, why: &str, n: usize, positives: usize) -> Subgroup {
        Subgroup {
            column: self.name.clone(),
            value: "(not analysed)".to_owned(),
            missing: false,
            not_analysed: true,
            n,
            positives,
            status: "insufficient",
            reason: Some(why.to_owned()),
            metrics: None,
            multiclass: None,
        }
    }
}

impl Subgroup {
    /// The value as a reader sees it: the markers as they are, a cell that reads like one
    /// in quotes (a cell `(missing)` beside empty cells made two entries of one name: a
    /// red-team finding).
    pub fn label(&self) -> String {
        let looks_like_a_marker = matches!(self.value.as_str(), "(missing)" | "(not analysed)")
            || self.value.starts_with('"');
        if !self.missing && !self.not_analysed && looks_like_a_marker {
            format!("\"{}\"", self.value)
        } else {
            self.value.clone()
        }
    }
}

/// A subgroup's value as reported (an empty cell is `(missing)`).
fn shown(value: &str) -> String {
    if value.is_empty() {
        "(missing)".to_owned()
    } else {
        value.to_owned()
    }
}

/// Subgroups of a multi-class evaluation: each value of each column, or why it has no
/// metrics (fewer rows than the minimum, fewer than two classes present). `clusters`: rows
/// clustered by patient (as [`crate::multiclass::evaluate`] takes them).
pub fn multiclass_subgroups(
    y: &[usize],
    p: &[f64],
    labels: &[String],
    subgroups: &[SubgroupColumn],
    settings: &Settings,
    clusters: Option<(&[usize], usize)>,
) -> Vec<Subgroup> {
    let k = labels.len();
    let mut out = Vec::new();
    for column in subgroups {
        let groups = match column.groups() {
            Ok(g) => g,
            Err(why) => {
                out.push(column.not_analysed(why, y.len(), 0));
                continue;
            }
        };
        for (value, rows) in groups {
            let sy: Vec<usize> = rows.iter().map(|&i| y[i]).collect();
            let sp: Vec<f64> = rows
                .iter()
                .flat_map(|&i| p[i * k..(i + 1) * k].iter().copied())
                .collect();
            let present = sy.iter().collect::<std::collections::BTreeSet<_>>().len();
            let patients = clusters.map(|(c, _)| distinct_patients(&rows, c));
            let reason = insufficient(rows.len(), patients, present < 2, settings);
            out.push(Subgroup {
                column: column.name.clone(),
                value: shown(value),
                missing: value.is_empty(),
                not_analysed: false,
                n: rows.len(),
                positives: 0,
                status: if reason.is_some() {
                    "insufficient"
                } else {
                    "ok"
                },
                metrics: None,
                multiclass: reason.is_none().then(|| {
                    let of: Option<Vec<usize>> =
                        clusters.map(|(c, _)| rows.iter().map(|&i| c[i]).collect());
                    crate::multiclass::evaluate(
                        &sy,
                        &sp,
                        labels,
                        settings.confidence,
                        None,
                        of.as_deref().zip(clusters.map(|(_, k)| k)),
                    )
                }),
                reason,
            });
        }
    }
    out
}

/// Two versions on the same rows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    /// DeLong's test for `auroc(b) − auroc(a)`.
    pub auroc_difference: Option<PairedDeLong>,
    pub n: usize,
}

/// What was validated.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ModelIdentity {
    pub name: String,
    pub version: u64,
    /// SHA-256 of `bundle.toml` as read.
    pub manifest_sha256: String,
    /// SHA-256 of the version's `model.onnx`.
    pub model_sha256: String,
    /// The minisign key id of the manifest's signature (`None`: unsigned).
    pub signature_key_id: Option<String>,
    /// The engine that made the predictions (`tract`, `ort`); `None` for a predictions file.
    pub backend: Option<String>,
    pub output: String,
    pub positive_label: String,
}

/// The dataset as read.
#[derive(Clone, Debug, Serialize)]
pub struct DatasetSection {
    #[serde(flatten)]
    pub summary: DatasetSummary,
    /// `tabular-csv` or `predictions-csv`.
    pub kind: &'static str,
    /// Where the dataset came from: `file` (a file the operator's side provides: the
    /// `validate` command, or a dataset under the server's `--validation-root`) or `upload`
    /// (uploaded in a `POST /validation/runs`). The deployment gate
    /// (`--require-validation`) counts only `file` datasets: an upload's labels are whatever
    /// the uploader wrote.
    pub origin: &'static str,
    pub label_column: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_column: Option<String>,
    pub subgroup_columns: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_column: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clusters: Option<usize>,
    pub rows_used: usize,
    pub rows_unusable: usize,
    /// The first 1,000 unusable rows with their reasons.
    pub unusable: Vec<Unusable>,
    pub unusable_truncated: bool,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// RFC 3339, UTC.
    pub created: String,
    /// The run's identifier: the audit records of its predictions are `validate-<run_id>-<n>`
    /// (a run over HTTP: the run's id in `/validation/runs/{id}`).
    pub run_id: String,
    pub nightingale_version: String,
    /// `inference` (the bundle ran on the dataset) or `predictions` (a predictions file).
    pub source: &'static str,
    pub model: Option<ModelIdentity>,
    pub dataset: DatasetSection,
    pub settings: Settings,
    /// `binary` (one positive label's probability) or `multiclass` (one output's K class
    /// probabilities: one-vs-rest and macro averages).
    pub task: &'static str,
    /// Binary: the metrics at the top level of report.json.
    #[serde(flatten)]
    pub metrics: Option<Metrics>,
    /// Multi-class: its metrics at the top level of report.json (`auroc` is the macro mean).
    #[serde(flatten)]
    pub multiclass: Option<MulticlassMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curves: Option<Curves>,
    pub subgroups: Vec<Subgroup>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
    pub gate: Option<GateResult>,
    /// The TRIPOD+AI items this report can fill, by item.
    pub tripod_ai: BTreeMap<String, String>,
}

/// Predictions with their labels, subgroups and clusters.
pub struct Scored<'a> {
    pub y: &'a [bool],
    pub p: &'a [f64],
    pub subgroups: &'a [SubgroupColumn],
    pub clusters: Option<&'a [String]>,
}

fn with_bootstrap(mut m: Metric, ci: Option<BootstrapCi>, primary: bool) -> Metric {
    if let Some(ci) = ci {
        if primary {
            m.set_bootstrap_interval(ci);
        } else {
            m.bootstrap = Some(ci);
        }
    }
    m
}

/// The metrics of rows `y`, `p` (with bootstrap intervals when `bootstrap` is given).
pub fn compute_metrics(
    y: &[bool],
    p: &[f64],
    thresholds: &[NamedThreshold],
    settings: &Settings,
    bootstrap: Option<&bootstrap::BootstrapResult>,
    with_targets: bool,
) -> Metrics {
    let conf = settings.confidence;
    let n = y.len();
    let (positives, negatives) = metrics::class_counts(y);
    let one_class = if n == 0 { "no rows" } else { "only one class" };
    let auroc = with_bootstrap(
        Metric::auroc(y, p, conf, "needs at least two rows of each class"),
        bootstrap.and_then(|b| b.auroc),
        false,
    );
    let auprc = with_bootstrap(
        Metric::point(metrics::average_precision(y, p), n, "no positives"),
        bootstrap.and_then(|b| b.auprc),
        true,
    );
    let brier = with_bootstrap(
        Metric::point(metrics::brier(y, p), n, "no rows"),
        bootstrap.and_then(|b| b.brier),
        true,
    );
    let (calibration_intercept, calibration_slope) = match metrics::calibration(y, p, conf) {
        Some(c) => {
            let m = |e: Option<metrics::Estimate>, why: &'static str| match e {
                Some(e) => Metric {
                    value: Some(e.value),
                    ci_lower: Some(e.ci_lower),
                    ci_upper: Some(e.ci_upper),
                    ci_method: Some("wald"),
                    n,
                    standard_error: Some(e.standard_error),
                    ..Metric::default()
                },
                None => Metric::undefined(n, why),
            };
            (
                m(
                    c.intercept,
                    "the calibration-in-the-large fit has no finite maximum (scores of 0 or 1, or within 1e-12 of them, decide the rows that could place it)",
                ),
                m(
                    c.slope,
                    "the logistic recalibration fit has no maximum (all scores equal, or scores that separate the classes)",
                ),
            )
        }
        None => (
            Metric::undefined(n, one_class),
            Metric::undefined(n, one_class),
        ),
    };
    let rel = metrics::reliability(y, p, settings.calibration_bins);
    let ece = Metric::point(rel.as_ref().map(|r| r.ece), n, "no rows");
    let mce = Metric::point(rel.as_ref().map(|r| r.mce), n, "no rows");
    let mut operating_points: Vec<OperatingPoint> = thresholds
        .iter()
        .map(|t| {
            OperatingPoint::at(
                t.name.clone(),
                "bundle",
                None,
                t.value,
                t.description.clone(),
                y,
                p,
                conf,
            )
        })
        .collect();
    if with_targets {
        for &s in &settings.target_sensitivities {
            if let Some(t) = metrics::threshold_for_sensitivity(y, p, s) {
                operating_points.push(OperatingPoint::at(
                    format!("sensitivity>={s}"),
                    "target-sensitivity",
                    Some(s),
                    t,
                    String::new(),
                    y,
                    p,
                    conf,
                ));
            }
        }
        for &s in &settings.target_specificities {
            if let Some(t) = metrics::threshold_for_specificity(y, p, s) {
                operating_points.push(OperatingPoint::at(
                    format!("specificity>={s}"),
                    "target-specificity",
                    Some(s),
                    t,
                    String::new(),
                    y,
                    p,
                    conf,
                ));
            }
        }
    }
    Metrics {
        n,
        positives,
        negatives,
        patients: None,
        prevalence: Metric::proportion(metrics::wilson(positives, n, conf), "no rows"),
        auroc,
        auprc,
        brier,
        calibration_intercept,
        calibration_slope,
        ece,
        mce,
        operating_points,
    }
}

/// How many distinct patients `rows` hold (`clusters[i]`: row i's patient).
fn distinct_patients(rows: &[usize], clusters: &[usize]) -> usize {
    rows.iter()
        .map(|&i| clusters[i])
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Each row's cluster (patient) as an index in `0..k`, in order of first appearance, and `k`.
pub fn cluster_index(ids: &[String]) -> (Vec<usize>, usize) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let idx = ids
        .iter()
        .map(|s| {
            let k = seen.len();
            *seen.entry(s.as_str()).or_insert(k)
        })
        .collect();
    (idx, seen.len())
}

/// The overall metrics, curves and subgroups of scored rows.
pub fn evaluate(
    scored: &Scored<'_>,
    thresholds: &[NamedThreshold],
    settings: &Settings,
) -> (Metrics, Curves, Vec<Subgroup>, Option<usize>) {
    let (y, p) = (scored.y, scored.p);
    let (cluster_index, n_clusters) = scored.clusters.map(cluster_index).unzip();
    let spec = BootstrapSpec {
        replicates: settings.bootstrap_replicates,
        seed: settings.seed,
        confidence: settings.confidence,
        stop: settings.stop.clone(),
    };
    let boot = (settings.bootstrap_replicates > 0)
        .then(|| bootstrap::bootstrap(y, p, cluster_index.as_deref().zip(n_clusters), spec));
    let mut overall = compute_metrics(y, p, thresholds, settings, boot.as_ref(), true);
    if let (Some(c), Some(k)) = (&cluster_index, n_clusters) {
        overall.clustered(y, c, k);
    }
    let curves = Curves {
        roc: metrics::thin(&metrics::roc_curve(y, p), 500),
        roc_band: boot
            .as_ref()
            .map(|b| b.roc_band.clone())
            .unwrap_or_default(),
        precision_recall: metrics::thin(&metrics::pr_curve(y, p), 500),
        reliability: metrics::reliability(y, p, settings.calibration_bins),
        decision: metrics::decision_curve(y, p, &settings.decision_thresholds),
    };
    let mut subgroups = Vec::new();
    for column in scored.subgroups {
        let groups = match column.groups() {
            Ok(g) => g,
            Err(why) => {
                let positives = y.iter().filter(|&&v| v).count();
                subgroups.push(column.not_analysed(why, y.len(), positives));
                continue;
            }
        };
        for (value, rows) in groups {
            let sy: Vec<bool> = rows.iter().map(|&i| y[i]).collect();
            let sp: Vec<f64> = rows.iter().map(|&i| p[i]).collect();
            let (pos, neg) = metrics::class_counts(&sy);
            let patients = cluster_index
                .as_deref()
                .map(|c| distinct_patients(&rows, c));
            let reason = insufficient(rows.len(), patients, pos == 0 || neg == 0, settings);
            subgroups.push(Subgroup {
                column: column.name.clone(),
                value: shown(value),
                missing: value.is_empty(),
                not_analysed: false,
                n: rows.len(),
                positives: pos,
                status: if reason.is_some() {
                    "insufficient"
                } else {
                    "ok"
                },
                metrics: reason.is_none().then(|| {
                    let mut m = compute_metrics(&sy, &sp, thresholds, settings, None, false);
                    if let (Some(c), Some(k)) = (&cluster_index, n_clusters) {
                        let rows_clusters: Vec<usize> = rows.iter().map(|&i| c[i]).collect();
                        m.clustered(&sy, &rows_clusters, k);
                    }
                    m
                }),
                multiclass: None,
                reason,
            });
        }
    }
    (overall, curves, subgroups, n_clusters)
}

/// Paired comparison of two score vectors on the same rows.
pub fn compare(
    y: &[bool],
    a: &[f64],
    b: &[f64],
    names: (String, String),
    confidence: f64,
) -> Comparison {
    Comparison {
        a: names.0,
        b: names.1,
        auroc_difference: metrics::delong_paired(y, a, b, confidence),
        n: y.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subgroup_column_holds_its_values_once_and_stops_at_its_limits() {
        let mut c = SubgroupColumn::new("site");
        for v in ["b", "a", "b", "", "a"] {
            c.push(v);
        }
        assert_eq!(c.values, ["b", "a", ""]);
        assert_eq!(c.rows, [0, 1, 0, 2, 1]);
        let groups = c.groups().unwrap();
        let shown: Vec<(&str, Vec<usize>)> = groups;
        assert_eq!(shown, [("", vec![3]), ("a", vec![1, 4]), ("b", vec![0, 2])]);

        // Too many distinct values: the column lets go of what it held.
        let mut many = SubgroupColumn::new("id");
        for i in 0..=MAX_SUBGROUP_VALUES {
            many.push(&i.to_string());
        }
        assert!(many.values.is_empty() && many.rows.is_empty());
        let why = many.groups().unwrap_err();
        assert!(why.contains("more than 100 distinct values"), "{why}");
        many.push("0");
        assert!(many.rows.is_empty());

        // A value too long (never quoted in the reason).
        let mut long = SubgroupColumn::new("note");
        long.push("short");
        long.push(&"x".repeat(MAX_SUBGROUP_VALUE_BYTES + 1));
        let why = long.groups().unwrap_err();
        assert!(
            why.contains("over 128 bytes") && !why.contains("xx"),
            "{why}"
        );
        let mut edge = SubgroupColumn::new("note");
        edge.push(&"x".repeat(MAX_SUBGROUP_VALUE_BYTES));
        assert!(edge.groups().is_ok());
    }

    /// Red-team finding: under --patient-id-column a subgroup of 100 rows from 2 patients got
    /// metrics. Its minimum counts patients then (binary and multi-class alike).
    #[test]
    fn a_subgroup_of_few_patients_is_insufficient_when_rows_are_clustered() {
        let y: Vec<bool> = (0..200).map(|i| i % 3 == 0).collect();
        let p: Vec<f64> = (0..200).map(|i| f64::from(i) / 200.0).collect();
        let mut site = SubgroupColumn::new("site");
        // "north": 100 rows of 2 patients; "south": 100 rows of 50 patients.
        let patients: Vec<String> = (0..200)
            .map(|i| {
                if i < 100 {
                    format!("n{}", i % 2)
                } else {
                    format!("s{}", i % 50)
                }
            })
            .collect();
        for i in 0..200 {
            site.push(if i < 100 { "north" } else { "south" });
        }
        let settings = Settings {
            bootstrap_replicates: 0,
            ..Settings::default()
        };
        let columns = [site];
        let status = |clusters: Option<&[String]>| -> Vec<(String, &'static str, Option<String>)> {
            let scored = Scored {
                y: &y,
                p: &p,
                subgroups: &columns,
                clusters,
            };
            let (_, _, subgroups, _) = evaluate(&scored, &[], &settings);
            subgroups
                .into_iter()
                .map(|s| (s.value, s.status, s.reason))
                .collect()
        };
        let rows = status(None);
        assert!(rows.iter().all(|(_, s, _)| *s == "ok"), "{rows:?}");
        let clustered = status(Some(&patients));
        assert_eq!(clustered[0].1, "insufficient", "{clustered:?}");
        assert!(
            clustered[0]
                .2
                .as_deref()
                .is_some_and(|r| r.starts_with("2 patients, fewer than the minimum of 30")),
            "{clustered:?}"
        );
        assert_eq!(clustered[1].1, "ok", "{clustered:?}");
        // Multi-class: the same rule.
        let labels: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let yk: Vec<usize> = y.iter().map(|&b| usize::from(b)).collect();
        let pk: Vec<f64> = p.iter().flat_map(|&v| [1.0 - v, v]).collect();
        let (index, k) = cluster_index(&patients);
        let sub = multiclass_subgroups(&yk, &pk, &labels, &columns, &settings, Some((&index, k)));
        assert_eq!(
            sub.iter().map(|s| s.status).collect::<Vec<_>>(),
            ["insufficient", "ok"]
        );
    }

    #[test]
    fn a_column_not_analysed_is_one_entry_saying_why() {
        let y: Vec<bool> = (0..200).map(|i| i % 3 == 0).collect();
        let p: Vec<f64> = (0..200).map(|i| f64::from(i) / 200.0).collect();
        let mut site = SubgroupColumn::new("site");
        let mut id = SubgroupColumn::new("patient");
        for i in 0..200 {
            site.push(if i < 100 { "north" } else { "south" });
            id.push(&format!("p{i}"));
        }
        let settings = Settings {
            bootstrap_replicates: 0,
            ..Settings::default()
        };
        let columns = [site, id];
        let scored = Scored {
            y: &y,
            p: &p,
            subgroups: &columns,
            clusters: None,
        };
        let (_, _, subgroups, _) = evaluate(&scored, &[], &settings);
        let values: Vec<(&str, &str, &str)> = subgroups
            .iter()
            .map(|s| (s.column.as_str(), s.value.as_str(), s.status))
            .collect();
        assert_eq!(
            values,
            [
                ("site", "north", "ok"),
                ("site", "south", "ok"),
                ("patient", "(not analysed)", "insufficient")
            ]
        );
        let refused = &subgroups[2];
        assert_eq!((refused.n, refused.positives), (200, 67));
        assert!(
            refused
                .reason
                .as_deref()
                .unwrap()
                .contains("distinct values")
        );
        assert_eq!(subgroups[0].n + subgroups[1].n, 200);
    }

    /// Red-team finding: a cell reading `(missing)` and the empty cells' entry had one name.
    #[test]
    fn a_cell_that_reads_like_a_marker_is_told_apart() {
        let entry = |value: &str, missing: bool, not_analysed: bool| Subgroup {
            column: "site".to_owned(),
            value: value.to_owned(),
            missing,
            not_analysed,
            n: 1,
            positives: 0,
            status: "ok",
            reason: None,
            metrics: None,
            multiclass: None,
        };
        assert_eq!(entry("(missing)", true, false).label(), "(missing)");
        assert_eq!(entry("(missing)", false, false).label(), "\"(missing)\"");
        assert_eq!(
            entry("(not analysed)", false, true).label(),
            "(not analysed)"
        );
        assert_eq!(
            entry("(not analysed)", false, false).label(),
            "\"(not analysed)\""
        );
        assert_eq!(entry("\"a\"", false, false).label(), "\"\"a\"\"");
        assert_eq!(entry("north", false, false).label(), "north");
        let json = serde_json::to_value(entry("", true, false)).unwrap();
        assert_eq!(json["missing"], true);
        assert!(json.get("not_analysed").is_none());
    }
}
