//! `bundle.toml`: what a model bundle declares about itself. See `docs/bundle-format.md`.

use std::collections::BTreeMap;

use nightingale_inference::{DataType, ModelMetadata, TensorSpec};
use serde::{Deserialize, Serialize};

use crate::preprocess::Preprocessing;

/// The manifest format this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// A bundle manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    /// A number the author raises with every release of the bundle (covered by its
    /// signature): a server that has served release N refuses a manifest of a lower one,
    /// unless an operator rolls back to it (`crate::releases`). `None`: not numbered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    pub task: TaskKind,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_platform")]
    pub platform: String,
    #[serde(default)]
    pub backend: BackendPreference,
    #[serde(default)]
    pub version_policy: VersionPolicy,
    #[serde(default)]
    pub batching: Batching,
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    #[serde(default)]
    pub thresholds: Vec<Threshold>,
    /// How an image becomes the model's input (image models fed from DICOM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessing: Option<Preprocessing>,
    /// The DICOM series the imaging pipeline may route to this bundle (`None`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<DicomAccepts>,
    #[serde(default)]
    pub intended_use: IntendedUse,
    #[serde(default)]
    pub provenance: Provenance,
    /// The load-time self-test every version runs (see `docs/bundle-format.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selftest: Option<SelfTestSpec>,
    /// Tabular models: the reference point of attributions (see `docs/cds-hooks.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
    /// The floors `nightingale validate` holds a version to (see `docs/validation.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationSpec>,
    /// Which explanation methods `/explain` offers for this bundle, and at what cost
    /// (see `docs/explain.md`). `None`: none, unless the server runs with `--explain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<ExplainSpec>,
    /// `platform = "candle"`: which native architecture runs the weights, and the file that
    /// configures it (see `docs/bundle-format.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candle: Option<CandleSpec>,
    /// Version number (a positive integer, as the folder is named) → its entry.
    pub versions: BTreeMap<String, VersionEntry>,
}

fn default_platform() -> String {
    "onnx".into()
}

/// The platforms a bundle may declare: ONNX files (tract or ONNX Runtime) or native candle
/// architectures with safetensors weights.
pub const PLATFORMS: &[&str] = &["onnx", "candle"];

/// `[candle]`: a native candle model. Each version folder holds the architecture file
/// (`config`) and the safetensors weights (the version's `model_file`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandleSpec {
    /// The architecture Nightingale builds (implemented in Rust with candle-nn), e.g.
    /// `conv-classifier`.
    pub architecture: String,
    /// The architecture file in each version folder: its layers and their tensors' names.
    #[serde(default = "default_candle_config")]
    pub config: String,
}

fn default_candle_config() -> String {
    "architecture.json".into()
}

/// Explanation methods that need the model's gradients (a `platform = "candle"` bundle).
pub const GRADIENT_METHODS: &[&str] = &["grad_cam", "integrated_gradients"];

/// What kind of question the model answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    ImageClassification,
    ImageSegmentation,
    TabularRisk,
    Triage,
    Regression,
    TextClassification,
    Other,
}

/// Which engine the bundle asks for; `any` lets the server choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendPreference {
    #[default]
    Any,
    Tract,
    Ort,
}

/// Which versions on disk are served, as in Triton's `version_policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionPolicy {
    pub policy: PolicyKind,
    /// With `latest`: how many of the highest versions.
    #[serde(default = "one")]
    pub latest: usize,
    /// With `specific`: which versions.
    #[serde(default)]
    pub versions: Vec<u64>,
}

fn one() -> usize {
    1
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy {
            policy: PolicyKind::Latest,
            latest: 1,
            versions: vec![],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    Latest,
    All,
    Specific,
}

impl VersionPolicy {
    /// The versions to serve out of those available (sorted ascending).
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        let mut v: Vec<u64> = match self.policy {
            PolicyKind::All => available.to_vec(),
            PolicyKind::Latest => {
                let mut sorted = available.to_vec();
                sorted.sort_unstable();
                sorted.into_iter().rev().take(self.latest.max(1)).collect()
            }
            PolicyKind::Specific => available
                .iter()
                .copied()
                .filter(|v| self.versions.contains(v))
                .collect(),
        };
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Most requests one model's queue may hold (`[batching] queue_capacity`).
pub const MAX_QUEUE_CAPACITY: u64 = 1 << 20;
/// Most rows in one batch or one request (`max_batch_size`, `max_rows_per_request`).
pub const MAX_BATCH_SIZE: u64 = 1 << 20;
/// The longest batching wait: 10 s.
pub const MAX_QUEUE_DELAY_US: u64 = 10_000_000;

/// Dynamic batching and instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// 0 or 1 turns dynamic batching off.
    #[serde(default)]
    pub max_batch_size: usize,
    #[serde(default = "default_delay")]
    pub max_queue_delay_us: u64,
    #[serde(default)]
    pub preferred_batch_sizes: Vec<usize>,
    #[serde(default = "one")]
    pub instances: usize,
    #[serde(default = "default_capacity")]
    pub queue_capacity: usize,
    /// Bytes of inputs that may wait in the queue before new requests get 503.
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: usize,
    /// Most rows one request may carry, batching or not (beyond: 400).
    #[serde(default = "default_max_rows")]
    pub max_rows_per_request: usize,
}

fn default_queue_bytes() -> usize {
    nightingale_inference::DEFAULT_QUEUE_BYTES
}

fn default_max_rows() -> usize {
    nightingale_inference::DEFAULT_MAX_ROWS_PER_REQUEST
}

fn default_delay() -> u64 {
    100
}

fn default_capacity() -> usize {
    1024
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_batch_size: 0,
            max_queue_delay_us: default_delay(),
            preferred_batch_sizes: vec![],
            instances: 1,
            queue_capacity: default_capacity(),
            queue_bytes: default_queue_bytes(),
            max_rows_per_request: default_max_rows(),
        }
    }
}

/// A model input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub datatype: DataType,
    /// `-1` for a dimension of any size.
    pub shape: Vec<i64>,
    #[serde(default)]
    pub description: String,
    /// Tabular models: one entry per column of the last dimension, in order.
    #[serde(default)]
    pub features: Vec<FeatureSpec>,
    /// Accept NaN/infinite values (models that treat NaN as "missing"). Default: refused with 400.
    #[serde(default)]
    pub allow_non_finite: bool,
}

/// One column of a tabular input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub name: String,
    #[serde(default)]
    pub unit: String,
    #[serde(default)]
    pub description: String,
    /// A coding for the feature (e.g. `http://loinc.org|8867-4`), so FHIR data can be mapped to it:
    /// the latest FHIR Observation with this code (or a component with it), converted to `unit`.
    #[serde(default)]
    pub code: Option<String>,
    /// Where the feature comes from in FHIR when it is not an Observation (`code`): the two
    /// are exclusive; a feature with neither has no FHIR source (a CDS service reports it
    /// missing, never imputes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir: Option<FhirSource>,
    /// `fhir = "condition"`: the Condition codes (`system|code`) whose active presence makes
    /// the feature 1 (else 0, when the patient's Conditions were read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<String>,
    /// `fhir = "encounter-class"`: the Encounter.class codes (HL7 v3 ActCode, e.g. `EMER`)
    /// that make the feature 1 (else 0) for the current Encounter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encounter_class: Vec<String>,
    /// Range seen in the training data.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// `code` features: how old (in hours) an Observation may be to count, instead of the CDS
    /// service's look-back (e.g. a glucose tolerance test from last month, a heart rate
    /// from the last hours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub look_back_hours: Option<f64>,
    /// `code` features: the analyte's molar mass in g/mol, which lets a value written in a
    /// molar unit (`mmol/L`) be converted to a mass unit (`mg/dL`, `g/L`) and back (e.g.
    /// glucose 180.156: 1 mmol/L = 18.0156 mg/dL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub molar_mass: Option<f64>,
}

/// A FHIR source of a feature other than an Observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FhirSource {
    /// Whole years from `Patient.birthDate` to the time of the call (unit `a`).
    PatientAge,
    /// 1 when `Patient.gender` is `female`, 0 when `male`; other values are missing.
    PatientFemale,
    /// 1 when an active Condition has one of `conditions`, else 0.
    Condition,
    /// 1 when the current Encounter's class is one of `encounter_class`, else 0.
    EncounterClass,
}

/// `[attribution]`: the reference point a prediction's contributions are measured from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attribution {
    /// What the reference is; only `"training-mean"` (the mean of each feature over the
    /// data the model was trained on).
    pub reference: AttributionReference,
    /// The reference value of each feature of the (single) tabular input, in column order.
    pub means: Vec<f64>,
}

/// The explanation methods of `/explain` (the kept-stable names of `parameters.method`).
pub const EXPLAIN_METHODS: &[&str] = &[
    "occlusion",
    "rise",
    "kernel_shap",
    "linear",
    "grad_cam",
    "integrated_gradients",
];

/// Most forward passes a bundle may allow one explanation: 2²⁰ model rows.
pub const MAX_EXPLAIN_FORWARD_PASSES: usize = 1 << 20;

/// Most rows of a KernelSHAP background declared in `[explain]`.
pub const MAX_EXPLAIN_BACKGROUND_ROWS: usize = 1024;

/// `[explain]`: what `/explain` may compute for this bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainSpec {
    /// The methods allowed (from [`EXPLAIN_METHODS`]).
    pub methods: Vec<String>,
    /// Most forward passes (model rows) one explain request may cost.
    #[serde(default = "default_explain_budget")]
    pub max_forward_passes: usize,
    /// KernelSHAP's background sample: rows of the (single) tabular input, in feature order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub background: Vec<Vec<f64>>,
}

/// The default [`ExplainSpec::max_forward_passes`] (and the server's under `--explain`).
pub const DEFAULT_EXPLAIN_FORWARD_PASSES: usize = 4096;

fn default_explain_budget() -> usize {
    DEFAULT_EXPLAIN_FORWARD_PASSES
}

/// `[validation]`: the deployment gate. `nightingale validate` exits 1 when a criterion fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ValidationSpec {
    /// Every criterion must hold (`[[validation.gate]]`).
    #[serde(default)]
    pub gate: Vec<GateCriterion>,
    /// The fewest rows of the positive class a dataset needs for the gate to pass
    /// (default [`DEFAULT_MIN_POSITIVES`]). A floor against a gate passing on a handful of
    /// rows, where the report's large-sample intervals say nothing; not a sample-size
    /// calculation (docs/validation.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_positives: Option<u64>,
    /// The same floor on the rows of the other class(es) (default [`DEFAULT_MIN_NEGATIVES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_negatives: Option<u64>,
    /// The largest share of the rows read that may be unusable (a missing or non-numeric
    /// feature, a label outside the classes) for the gate to pass (default
    /// [`DEFAULT_MAX_UNUSABLE_FRACTION`]): the metrics describe the usable rows only, and
    /// dropping rows with missing inputs can select the easy cases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unusable_fraction: Option<f64>,
}

/// [`ValidationSpec::max_unusable_fraction`] when a bundle does not set it: a tenth.
pub const DEFAULT_MAX_UNUSABLE_FRACTION: f64 = 0.1;

/// [`ValidationSpec::min_positives`] when a bundle does not set it: ten rows of each class.
/// Below ten, one row moves a sensitivity or specificity by more than ten points; see
/// docs/validation.md for why ten and not more.
pub const DEFAULT_MIN_POSITIVES: u64 = 10;
/// [`ValidationSpec::min_negatives`] when a bundle does not set it.
pub const DEFAULT_MIN_NEGATIVES: u64 = 10;

/// The smallest `min_positives` / `min_negatives` a bundle may declare: DeLong's interval
/// needs two rows of each class, so a lower floor could never be met by an interval.
pub const MIN_EVENTS_FLOOR: u64 = 2;

/// One floor (or ceiling) on one metric of a validation report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateCriterion {
    /// One of [`GATE_METRICS`].
    pub metric: String,
    /// For the metrics at an operating point ([`THRESHOLD_METRICS`]): the `[[thresholds]]`
    /// entry's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<String>,
    /// Which number of the metric is held to the bound: its value or a confidence limit.
    #[serde(default)]
    pub bound: GateBound,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The versions the criterion holds for (empty: every version), e.g. for a threshold
    /// that only one version uses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<u64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

impl ValidationSpec {
    /// The criteria that hold for `version` (`None`: a predictions file without a version:
    /// every criterion).
    pub fn gate_for(&self, version: Option<u64>) -> Vec<GateCriterion> {
        self.gate
            .iter()
            .filter(|c| match version {
                Some(v) => c.versions.is_empty() || c.versions.contains(&v),
                None => true,
            })
            .cloned()
            .collect()
    }

    /// The positive rows a dataset needs for the gate to pass (the bundle's or the default).
    pub fn min_positives(&self) -> u64 {
        self.min_positives.unwrap_or(DEFAULT_MIN_POSITIVES)
    }

    /// The negative rows a dataset needs for the gate to pass (the bundle's or the default).
    pub fn min_negatives(&self) -> u64 {
        self.min_negatives.unwrap_or(DEFAULT_MIN_NEGATIVES)
    }

    /// The share of unusable rows a dataset may have for the gate to pass (the bundle's or
    /// the default).
    pub fn max_unusable_fraction(&self) -> f64 {
        self.max_unusable_fraction
            .unwrap_or(DEFAULT_MAX_UNUSABLE_FRACTION)
    }
}

/// The number of a metric a gate criterion reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateBound {
    /// The point estimate.
    #[default]
    Value,
    /// The lower limit of its confidence interval.
    CiLower,
    /// The upper limit of its confidence interval.
    CiUpper,
}

impl GateBound {
    pub fn as_str(self) -> &'static str {
        match self {
            GateBound::Value => "value",
            GateBound::CiLower => "ci_lower",
            GateBound::CiUpper => "ci_upper",
        }
    }
}

/// The metrics a gate criterion may name (the keys of `report.json`).
pub const GATE_METRICS: &[&str] = &[
    "auroc",
    "auprc",
    "brier",
    "calibration_intercept",
    "calibration_slope",
    "ece",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "accuracy",
];

/// The gate metrics measured at an operating point (they need `threshold`).
pub const THRESHOLD_METRICS: &[&str] =
    &["sensitivity", "specificity", "ppv", "npv", "f1", "accuracy"];

/// The gate metrics reported without a confidence interval.
pub const METRICS_WITHOUT_CI: &[&str] = &["ece", "f1"];

impl GateCriterion {
    /// A short name: `sensitivity@screening-v1.ci_lower`.
    pub fn label(&self) -> String {
        let mut s = self.metric.clone();
        if let Some(t) = &self.threshold {
            s.push('@');
            s.push_str(t);
        }
        if self.bound != GateBound::Value {
            s.push('.');
            s.push_str(self.bound.as_str());
        }
        s
    }

    fn check(&self, thresholds: &[Threshold]) -> Result<(), String> {
        let label = self.label();
        if !GATE_METRICS.contains(&self.metric.as_str()) {
            return Err(format!(
                "gate metric {:?} is not one of {}",
                self.metric,
                GATE_METRICS.join(", ")
            ));
        }
        let at_threshold = THRESHOLD_METRICS.contains(&self.metric.as_str());
        match (&self.threshold, at_threshold) {
            (None, true) => {
                return Err(format!(
                    "gate {label}: {} needs `threshold` (a [[thresholds]] name)",
                    self.metric
                ));
            }
            (Some(_), false) => {
                return Err(format!(
                    "gate {label}: {} is not measured at a threshold",
                    self.metric
                ));
            }
            (Some(t), true) if !thresholds.iter().any(|x| &x.name == t) => {
                return Err(format!(
                    "gate {label}: threshold {t:?} is not among [[thresholds]]"
                ));
            }
            _ => {}
        }
        if self.bound != GateBound::Value && METRICS_WITHOUT_CI.contains(&self.metric.as_str()) {
            return Err(format!(
                "gate {label}: {} has no confidence interval",
                self.metric
            ));
        }
        if self.min.is_none() && self.max.is_none() {
            return Err(format!("gate {label}: needs `min`, `max` or both"));
        }
        if self.min.is_some_and(|v| !v.is_finite()) || self.max.is_some_and(|v| !v.is_finite()) {
            return Err(format!("gate {label}: bounds must be finite"));
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max)
            && lo > hi
        {
            return Err(format!("gate {label}: min {lo} is above max {hi}"));
        }
        Ok(())
    }
}

/// The kinds of attribution reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttributionReference {
    /// The training data's mean of each feature.
    TrainingMean,
}

/// Checks that a feature names at most one FHIR source, completely.
fn check_feature_source(f: &FeatureSpec) -> Result<(), String> {
    let code_ok = |c: &str| {
        c.split_once('|').is_some_and(|(system, code)| {
            !system.is_empty()
                && !code.is_empty()
                && !code.contains('|')
                && c.len() <= 256
                && !c.chars().any(char::is_whitespace)
        })
    };
    if let Some(c) = &f.code
        && !code_ok(c)
    {
        return Err(format!("code {c:?} is not SYSTEM|CODE"));
    }
    if f.code.is_some() && f.fhir.is_some() {
        return Err("code (an Observation) and fhir are exclusive".into());
    }
    if f.code.is_none() && (f.look_back_hours.is_some() || f.molar_mass.is_some()) {
        return Err("look_back_hours and molar_mass are for code (Observation) features".into());
    }
    if let Some(h) = f.look_back_hours
        && !(h > 0.0 && h <= 24.0 * 366.0 * 10.0)
    {
        return Err(format!(
            "look_back_hours {h} must be above 0 and at most ten years"
        ));
    }
    if let Some(m) = f.molar_mass
        && !(m > 0.0 && m < 1e7)
    {
        return Err(format!("molar_mass {m} must be a positive g/mol"));
    }
    match f.fhir {
        Some(FhirSource::Condition) => {
            if f.conditions.is_empty() {
                return Err("fhir = \"condition\" needs a conditions list".into());
            }
            if let Some(c) = f.conditions.iter().find(|c| !code_ok(c)) {
                return Err(format!("condition {c:?} is not SYSTEM|CODE"));
            }
        }
        _ if !f.conditions.is_empty() => {
            return Err("conditions is only for fhir = \"condition\"".into());
        }
        _ => {}
    }
    let bad_class =
        |c: &String| c.is_empty() || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_alphanumeric());
    match f.fhir {
        Some(FhirSource::EncounterClass)
            if f.encounter_class.is_empty() || f.encounter_class.iter().any(bad_class) =>
        {
            return Err(
                "fhir = \"encounter-class\" needs encounter_class codes (letters and digits)"
                    .into(),
            );
        }
        Some(FhirSource::EncounterClass) => {}
        _ if !f.encounter_class.is_empty() => {
            return Err("encounter_class is only for fhir = \"encounter-class\"".into());
        }
        _ => {}
    }
    if f.fhir == Some(FhirSource::PatientAge) && f.unit != "a" {
        return Err("fhir = \"patient-age\" gives years: unit must be \"a\"".into());
    }
    if matches!(
        f.fhir,
        Some(FhirSource::PatientFemale | FhirSource::Condition | FhirSource::EncounterClass)
    ) && f.unit != "1"
    {
        return Err("a 0/1 indicator from FHIR must have unit \"1\"".into());
    }
    Ok(())
}

/// A model output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    #[serde(default)]
    pub description: String,
    /// Class names for the last dimension of a probability output.
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub positive_label: Option<String>,
    /// The coded concept this output reports as present (at its `positive_label`, else its
    /// last label), e.g. SNOMED CT `27925004` "Nodule": the DICOM results' finding code. Absent:
    /// a local code (`99NIGHTINGALE`) of the bundle, output and label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finding_code: Option<ConceptCode>,
}

/// A coded concept as a bundle declares it (PS3.3 Code Sequence Macro):
/// `{ scheme = "SCT", value = "27925004", meaning = "Nodule" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConceptCode {
    /// Coding Scheme Designator (PS3.16 8: `SCT`, `DCM`, `LN`, `RADLEX`, or a private `99…`):
    /// 1–16 of `A-Z a-z 0-9 . _ -`.
    pub scheme: String,
    /// Code Value: 1–64 printable ASCII characters, no space or backslash (over 16 they are written as
    /// Long Code Value). A SNOMED CT (`SCT`) value must be a concept identifier: 6–18 digits
    /// whose check digit (Verhoeff) is right and whose partition is a concept's.
    pub value: String,
    /// Code Meaning: 1–64 characters, no backslash, no control characters.
    pub meaning: String,
}

impl ConceptCode {
    /// Why the code cannot be written into a DICOM object as declared, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        let ConceptCode {
            scheme,
            value,
            meaning,
        } = self;
        if !(1..=16).contains(&scheme.len())
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "scheme {:?}: a coding scheme designator is 1-16 of A-Z a-z 0-9 . _ -",
                shown(scheme)
            ));
        }
        if !(1..=64).contains(&value.len())
            || !value.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
        {
            return Err(format!(
                "value {:?}: a code value is 1-64 printable ASCII characters without spaces or backslashes",
                shown(value)
            ));
        }
        if meaning.trim() != meaning
            || !(1..=64).contains(&meaning.chars().count())
            || meaning.chars().any(|c| c == '\\' || c.is_control())
        {
            return Err(format!(
                "meaning {:?}: a code meaning is 1-64 characters, without backslashes, control characters or spaces at either end",
                shown(meaning)
            ));
        }
        if scheme == "SCT" {
            check_sctid(value).map_err(|why| format!("SNOMED CT value {value:?}: {why}"))?;
        }
        Ok(())
    }
}

/// A SNOMED CT concept identifier (SNOMED CT Technical Implementation Guide, "SCTID"): 6–18
/// digits, no leading zero, the last a Verhoeff check digit over the others, and the two
/// before it a concept's partition (`00` short format, `10` long format; a description's
/// `01`/`11` or a relationship's `02`/`12` pasted in its place is refused).
///
/// Written here rather than taken from a crate: no Verhoeff crate is among this project's
/// dependencies or its registry's verified ones, and the algorithm is three small tables.
pub fn check_sctid(value: &str) -> Result<(), &'static str> {
    if !(6..=18).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a concept identifier is 6-18 digits");
    }
    if value.starts_with('0') {
        return Err("a concept identifier has no leading zero");
    }
    if !verhoeff_valid(value) {
        return Err("its check digit is wrong (a typing error?)");
    }
    let partition = &value[value.len() - 3..value.len() - 1];
    if !matches!(partition, "00" | "10") {
        return Err("its partition is not a concept's (a description or relationship identifier?)");
    }
    Ok(())
}

/// Whether a string of decimal digits ends in its Verhoeff check digit.
fn verhoeff_valid(digits: &str) -> bool {
    const D: [[u8; 10]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
        [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
        [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
        [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
        [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
        [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ];
    const P: [[u8; 10]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
        [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
        [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
        [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
        [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ];
    let mut c = 0u8;
    for (i, b) in digits.bytes().rev().enumerate() {
        c = D[usize::from(c)][usize::from(P[i % 8][usize::from(b - b'0')])];
    }
    c == 0
}

/// `[dicom]`: what a bundle accepts from the DICOM pipeline. Every list left empty accepts
/// anything; the router never sends a series outside what is declared here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DicomAccepts {
    /// Modality (0008,0060) values, e.g. `["CR", "DX"]`.
    #[serde(default)]
    pub modalities: Vec<String>,
    /// Body Part Examined (0018,0015) values.
    #[serde(default)]
    pub body_parts: Vec<String>,
    /// Photometric Interpretation (0028,0004) values, e.g. `["MONOCHROME1", "MONOCHROME2"]`.
    #[serde(default)]
    pub photometric: Vec<String>,
    /// SOP Class UIDs.
    #[serde(default)]
    pub sop_classes: Vec<String>,
    /// Most frames per instance (each frame is one model input); `inference = "frame"` only.
    #[serde(default)]
    pub max_frames: Option<u32>,
    /// How the pipeline feeds the series to the model: each frame one input (`frame`, the
    /// default) or the whole series one volume (`volume`; docs/bundle-format.md).
    #[serde(default, skip_serializing_if = "DicomInference::is_frame")]
    pub inference: DicomInference,
    /// `inference = "volume"`: the fewest slices a volume may have (default
    /// [`DEFAULT_MIN_SLICES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_slices: Option<u32>,
    /// `inference = "volume"`: the most slices (default [`DEFAULT_MAX_SLICES`], at most
    /// [`MAX_SLICES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_slices: Option<u32>,
    /// Outputs reported in the result objects (default: those with a threshold).
    #[serde(default)]
    pub report: Vec<String>,
    /// A saliency heatmap over the secondary capture (`[dicom.heatmap]`).
    #[serde(default)]
    pub heatmap: Option<DicomHeatmap>,
}

/// `[dicom] inference`: what one model input is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DicomInference {
    /// Each frame of each instance is one model input; a series' finding is its highest
    /// probability over the frames.
    #[default]
    Frame,
    /// The series is one volume and one model input: the frames of its one multi-frame
    /// instance, or its single-frame instances, in slice order.
    Volume,
}

impl DicomInference {
    fn is_frame(&self) -> bool {
        *self == DicomInference::Frame
    }
}

/// A volume's fewest slices unless `[dicom] min_slices` says otherwise.
pub const DEFAULT_MIN_SLICES: u32 = 2;
/// A volume's most slices unless `[dicom] max_slices` says otherwise.
pub const DEFAULT_MAX_SLICES: u32 = 1024;
/// The most slices `[dicom] max_slices` may allow.
pub const MAX_SLICES: u32 = 4096;

impl DicomAccepts {
    /// `inference = "volume"`.
    pub fn is_volume(&self) -> bool {
        self.inference == DicomInference::Volume
    }

    /// The fewest and most slices of a volume.
    pub fn slices(&self) -> (u32, u32) {
        (
            self.min_slices.unwrap_or(DEFAULT_MIN_SLICES),
            self.max_slices.unwrap_or(DEFAULT_MAX_SLICES),
        )
    }
}

/// `[dicom.heatmap]`: the secondary capture shows where the model found its first reported
/// finding, computed by an `/explain` image method (one of `[explain] methods`) with these
/// options (the `/explain` parameters of the same names; absent ones take their defaults),
/// on the frame the secondary capture shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomHeatmap {
    /// `occlusion`, `rise`, `grad_cam` or `integrated_gradients`.
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// The `/explain` methods that make an image's saliency map.
pub const IMAGE_EXPLAIN_METHODS: &[&str] =
    &["occlusion", "rise", "grad_cam", "integrated_gradients"];

/// An operating point on an output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub name: String,
    pub output: String,
    #[serde(default)]
    pub label: Option<String>,
    pub value: f64,
    #[serde(default)]
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IntendedUse {
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub users: String,
    #[serde(default)]
    pub limitations: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    #[serde(default)]
    pub training_data: String,
    #[serde(default)]
    pub data_licence: String,
    #[serde(default)]
    pub model_licence: String,
    #[serde(default)]
    pub training_script: String,
}

/// `[selftest]`: each version folder holds `file` (reference inputs and the outputs the
/// exporting runtime produced); at load the engine must reproduce every output element `e`
/// as `a` with `|a - e| <= atol + rtol * |e|`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTestSpec {
    #[serde(default = "default_selftest_file")]
    pub file: String,
    pub atol: f64,
    pub rtol: f64,
    /// Per-output tolerances (output name → atol/rtol), overriding the defaults above.
    #[serde(default)]
    pub outputs: BTreeMap<String, Tolerance>,
}

/// An absolute and a relative tolerance.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

fn default_selftest_file() -> String {
    "selftest.json".into()
}

impl SelfTestSpec {
    /// The tolerance for one output.
    pub fn tolerance(&self, output: &str) -> Tolerance {
        self.outputs.get(output).copied().unwrap_or(Tolerance {
            atol: self.atol,
            rtol: self.rtol,
        })
    }
}

/// One version of the model: its folder's files and their SHA-256 checksums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionEntry {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub created: String,
    /// Which file the backend loads (default `model.onnx`).
    #[serde(default = "default_model_file")]
    pub model_file: String,
    /// Path inside the version folder → lowercase hex SHA-256. Every file in the folder is listed.
    pub files: BTreeMap<String, String>,
}

fn default_model_file() -> String {
    "model.onnx".into()
}

/// A manifest that breaks a rule the parser cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", shown(.0))]
pub struct InvalidManifest(pub String);

/// A reason as it is shown (answered over HTTP, logged, audited): at most 1 KiB, since it may
/// quote whatever a manifest holds (a 200 KB name).
fn shown(reason: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 1024;
    if reason.len() <= MAX {
        return reason.into();
    }
    let mut end = MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes cut)", &reason[..end], reason.len() - end).into()
}

/// A TOML error as `TOML parse error at line L, column C: message`, without the quoted line
/// and caret that `toml`'s own text carries: the reason is answered over HTTP and kept in the
/// audit trail, where the file's contents have no place (and a file that is not a manifest at
/// all must not be echoed).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(span) = e.span() else {
        return format!("TOML parse error: {message}");
    };
    let before = &text.as_bytes()[..span.start.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |nl| nl + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    format!("TOML parse error at line {line}, column {column}: {message}")
}

/// Names usable in URLs and on file systems: 1–128 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Manifest {
    /// Parses and checks a manifest's text.
    pub fn parse(text: &str) -> Result<Manifest, InvalidManifest> {
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| InvalidManifest(toml_error(text, &e)))?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn check_explain(&self, e: &ExplainSpec) -> Result<(), String> {
        for m in &e.methods {
            if !EXPLAIN_METHODS.contains(&m.as_str()) {
                return Err(format!(
                    "unknown method {m:?}; the methods are {EXPLAIN_METHODS:?}"
                ));
            }
        }
        if e.max_forward_passes == 0 || e.max_forward_passes > MAX_EXPLAIN_FORWARD_PASSES {
            return Err(format!(
                "max_forward_passes must be 1..={MAX_EXPLAIN_FORWARD_PASSES}, not {}",
                e.max_forward_passes
            ));
        }
        if e.background.len() > MAX_EXPLAIN_BACKGROUND_ROWS {
            return Err(format!(
                "the background has {} rows; at most {MAX_EXPLAIN_BACKGROUND_ROWS}",
                e.background.len()
            ));
        }
        if !e.background.is_empty() {
            let features = match self.inputs.as_slice() {
                [input] if !input.features.is_empty() => input.features.len(),
                _ => {
                    return Err(
                        "a background needs exactly one input, with [[inputs.features]]".into(),
                    );
                }
            };
            for (i, row) in e.background.iter().enumerate() {
                if row.len() != features {
                    return Err(format!(
                        "background row {i} has {} values for {features} features",
                        row.len()
                    ));
                }
                if row.iter().any(|v| !v.is_finite()) {
                    return Err(format!("background row {i} holds a non-finite value"));
                }
            }
        }
        if e.methods.iter().any(|m| m == "kernel_shap") && e.background.is_empty() {
            return Err("kernel_shap needs a background".into());
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), InvalidManifest> {
        let fail = |m: String| Err(InvalidManifest(m));
        if self.format_version != FORMAT_VERSION {
            return fail(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if !valid_name(&self.name) {
            return fail(format!(
                "name {:?} must be 1-128 of A-Z a-z 0-9 . _ -",
                self.name
            ));
        }
        if self.release == Some(0) {
            return fail("release must be a positive integer".to_owned());
        }
        if !PLATFORMS.contains(&self.platform.as_str()) {
            return fail(format!(
                "platform {:?} is not supported (one of {PLATFORMS:?})",
                self.platform
            ));
        }
        match (self.platform.as_str(), &self.candle) {
            ("candle", None) => {
                return fail(
                    "platform \"candle\" needs a [candle] section (architecture, config)".into(),
                );
            }
            ("candle", Some(c)) => {
                if c.architecture.is_empty() {
                    return fail("[candle] architecture must name an architecture".into());
                }
                if !safe_relative_path(&c.config) {
                    return fail(format!(
                        "[candle] config {:?} must be a relative path inside the version folder",
                        c.config
                    ));
                }
                if self.backend != BackendPreference::Any {
                    return fail(
                        "a platform \"candle\" bundle runs on the candle engine: leave backend = \"any\""
                            .into(),
                    );
                }
                for (version, entry) in &self.versions {
                    if !entry.files.contains_key(&c.config) {
                        return fail(format!(
                            "version {version}: the candle architecture file {:?} is not among its files",
                            c.config
                        ));
                    }
                    if entry.model_file == c.config {
                        return fail(format!(
                            "version {version}: [candle] config {:?} names the weights (model_file); it names the architecture file",
                            c.config
                        ));
                    }
                    if !entry.model_file.ends_with(".safetensors") {
                        return fail(format!(
                            "version {version}: model_file {:?} must name the safetensors weights",
                            entry.model_file
                        ));
                    }
                }
            }
            (_, Some(_)) => {
                return fail("a [candle] section needs platform = \"candle\"".into());
            }
            _ => {}
        }
        if let Some(e) = &self.explain
            && self.platform != "candle"
            && let Some(m) = e
                .methods
                .iter()
                .find(|m| GRADIENT_METHODS.contains(&m.as_str()))
        {
            return fail(format!(
                "[explain] method {m:?} needs the model's gradients, which only a platform = \"candle\" bundle gives"
            ));
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return fail("a bundle declares at least one input and one output".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (what, name, shape) in self
            .inputs
            .iter()
            .map(|i| ("input", &i.name, &i.shape))
            .chain(self.outputs.iter().map(|o| ("output", &o.name, &o.shape)))
        {
            if !seen.insert((what, name)) {
                return fail(format!("{what} {name:?} is declared twice"));
            }
            if shape.iter().any(|&d| d < -1) {
                return fail(format!(
                    "{what} {name:?} has a dimension below -1 in {shape:?}"
                ));
            }
        }
        for input in &self.inputs {
            if !input.features.is_empty() {
                let last = input.shape.last().copied().unwrap_or(-1);
                if last >= 0 && last as usize != input.features.len() {
                    return fail(format!(
                        "input {:?} lists {} features but its last dimension is {last}",
                        input.name,
                        input.features.len()
                    ));
                }
            }
            // Features are matched to dataset columns and FHIR sources by name: two of one
            // name would both be filled from one column.
            let mut names = std::collections::HashSet::new();
            if let Some(f) = input
                .features
                .iter()
                .find(|f| !names.insert(f.name.as_str()))
            {
                return fail(format!(
                    "input {:?} lists the feature {:?} twice",
                    input.name, f.name
                ));
            }
            for f in &input.features {
                check_feature_source(f).map_err(|reason| {
                    InvalidManifest(format!(
                        "input {:?} feature {:?}: {reason}",
                        input.name, f.name
                    ))
                })?;
            }
        }
        if let Some(a) = &self.attribution {
            let tabular: Vec<&InputSpec> = self
                .inputs
                .iter()
                .filter(|i| !i.features.is_empty())
                .collect();
            let [input] = tabular.as_slice() else {
                return fail(
                    "[attribution] needs exactly one input with [[inputs.features]]".to_owned(),
                );
            };
            if a.means.len() != input.features.len() {
                return fail(format!(
                    "[attribution] has {} means for {} features",
                    a.means.len(),
                    input.features.len()
                ));
            }
            if a.means.iter().any(|m| !m.is_finite()) {
                return fail("[attribution] means must be finite".to_owned());
            }
        }
        if let Some(e) = &self.explain {
            self.check_explain(e)
                .map_err(|m| InvalidManifest(format!("[explain] {m}")))?;
        }
        for output in &self.outputs {
            // Labels name the last dimension's columns: a count that differs (or a name
            // twice) made `positive_label` pick another column than the one it names, in
            // `classification` answers, explanations, CDS risk cards and validation (a
            // red-team finding: P(no diabetes) was served as "diabetes").
            if let Some(repeated) = output
                .labels
                .iter()
                .enumerate()
                .find_map(|(i, l)| output.labels[..i].contains(l).then_some(l))
            {
                return fail(format!(
                    "output {:?}: label {repeated:?} is given twice",
                    output.name
                ));
            }
            if !output.labels.is_empty()
                && let Some(&last) = output.shape.last()
                && last >= 0
                && last as usize != output.labels.len()
            {
                return fail(format!(
                    "output {:?} has {} labels for {last} columns (its last dimension): one label per column",
                    output.name,
                    output.labels.len()
                ));
            }
            if let Some(p) = &output.positive_label
                && !output.labels.contains(p)
            {
                return fail(format!(
                    "output {:?}: positive_label {p:?} is not among its labels",
                    output.name
                ));
            }
            if let Some(code) = &output.finding_code {
                code.check().map_err(|m| {
                    InvalidManifest(format!("output {:?}: finding_code {m}", output.name))
                })?;
            }
        }
        for (i, t) in self.thresholds.iter().enumerate() {
            if self.thresholds[..i].iter().any(|o| o.name == t.name) {
                return fail(format!("threshold {:?} is given twice", t.name));
            }
            let Some(output) = self.outputs.iter().find(|o| o.name == t.output) else {
                return fail(format!(
                    "threshold {:?} refers to unknown output {:?}",
                    t.name, t.output
                ));
            };
            if let Some(label) = &t.label
                && !output.labels.contains(label)
            {
                return fail(format!(
                    "threshold {:?}: label {label:?} is not among {:?}'s labels",
                    t.name, t.output
                ));
            }
            if !t.value.is_finite() {
                return fail(format!("threshold {:?} is not a finite number", t.name));
            }
        }
        if let Some(v) = &self.validation {
            if let Some(f) = v.max_unusable_fraction.filter(|f| !(0.0..=1.0).contains(f)) {
                return fail(format!(
                    "[validation] max_unusable_fraction = {f}: a fraction between 0 and 1"
                ));
            }
            for (key, value) in [
                ("min_positives", v.min_positives),
                ("min_negatives", v.min_negatives),
            ] {
                if let Some(n) = value.filter(|&n| n < MIN_EVENTS_FLOOR) {
                    return fail(format!(
                        "[validation] {key} = {n}: at least {MIN_EVENTS_FLOOR} (DeLong's interval needs two rows of each class)"
                    ));
                }
            }
            for c in &v.gate {
                c.check(&self.thresholds).map_err(InvalidManifest)?;
                if let Some(missing) = c
                    .versions
                    .iter()
                    .find(|v| !self.versions.contains_key(&v.to_string()))
                {
                    return fail(format!(
                        "gate {}: version {missing} is not among [versions]",
                        c.label()
                    ));
                }
            }
        }
        if let Some(pre) = &self.preprocessing {
            let Some(input) = self.inputs.iter().find(|i| i.name == pre.input) else {
                return fail(format!(
                    "preprocessing: input {:?} is not among the declared inputs",
                    pre.input
                ));
            };
            if input.datatype != DataType::Fp32 {
                return fail(format!(
                    "preprocessing: input {:?} must be FP32, not {}",
                    pre.input,
                    input.datatype.as_str()
                ));
            }
            match self.dicom.as_ref().filter(|d| d.is_volume()) {
                None => pre.validate(&input.shape).map_err(InvalidManifest)?,
                Some(dicom) => {
                    let depth = pre.volume_depth(&input.shape).map_err(InvalidManifest)?;
                    let (min, max) = dicom.slices();
                    if min == 0 || max < min || max > MAX_SLICES {
                        return fail(format!(
                            "[dicom] min_slices {min} and max_slices {max} need 1 <= min_slices <= max_slices <= {MAX_SLICES}"
                        ));
                    }
                    // The model input at its largest: D slices, or max_slices when D is any.
                    let [h, w] = pre.size;
                    let values = depth
                        .unwrap_or(max as usize)
                        .saturating_mul(h)
                        .saturating_mul(w);
                    if values > crate::preprocess::MAX_VOLUME_VALUES {
                        return fail(format!(
                            "[dicom] a volume input of {} x {h} x {w} is {values} values; at most {} (lower max_slices or the depth)",
                            depth.map_or(format!("up to {max}"), |d| d.to_string()),
                            crate::preprocess::MAX_VOLUME_VALUES
                        ));
                    }
                }
            }
        }
        if let Some(dicom) = &self.dicom {
            if self.preprocessing.is_none() {
                return fail(
                    "[dicom] needs [preprocessing]: how an image becomes the model's input".into(),
                );
            }
            for name in &dicom.report {
                if !self.outputs.iter().any(|o| &o.name == name) {
                    return fail(format!(
                        "[dicom] report: output {name:?} is not among the declared outputs"
                    ));
                }
            }
            if dicom.max_frames == Some(0) {
                return fail("[dicom] max_frames must be at least 1".into());
            }
            if dicom.is_volume() {
                if dicom.max_frames.is_some() {
                    return fail(
                        "[dicom] max_frames is for inference = \"frame\"; a volume bounds its slices with min_slices and max_slices".into(),
                    );
                }
                if dicom.heatmap.is_some() {
                    return fail(
                        "[dicom.heatmap] is not available with inference = \"volume\" (a heatmap is drawn over one image; see docs/bundle-format.md)".into(),
                    );
                }
            } else if dicom.min_slices.is_some() || dicom.max_slices.is_some() {
                return fail(
                    "[dicom] min_slices and max_slices need inference = \"volume\"".into(),
                );
            }
            if let Some(h) = &dicom.heatmap {
                if !IMAGE_EXPLAIN_METHODS.contains(&h.method.as_str()) {
                    return fail(format!(
                        "[dicom.heatmap] method {:?} does not make a saliency map; the image methods are {IMAGE_EXPLAIN_METHODS:?}",
                        h.method
                    ));
                }
                if !self
                    .explain
                    .as_ref()
                    .is_some_and(|e| e.methods.contains(&h.method))
                {
                    return fail(format!(
                        "[dicom.heatmap] method {:?} must be enabled in [explain] methods (with its forward-pass budget)",
                        h.method
                    ));
                }
                if [h.baseline, h.p]
                    .into_iter()
                    .flatten()
                    .any(|v| !v.is_finite())
                {
                    return fail("[dicom.heatmap] baseline and p must be finite".into());
                }
                if let (Some(patch), Some(stride)) = (h.patch, h.stride)
                    && stride > patch
                {
                    return fail(format!(
                        "[dicom.heatmap] stride {stride} must not exceed patch {patch} (pixels between the windows would have no saliency)"
                    ));
                }
            }
        }
        if self.versions.is_empty() {
            return fail("a bundle lists at least one version under [versions]".into());
        }
        for (version, entry) in &self.versions {
            if parse_version(version).is_none() {
                return fail(format!(
                    "version {version:?} must be a positive integer of at most 19 digits"
                ));
            }
            if entry.files.is_empty() {
                return fail(format!("version {version} lists no files"));
            }
            for (file, digest) in &entry.files {
                if !safe_relative_path(file) {
                    return fail(format!(
                        "version {version}: file name {file:?} must be a relative path inside the version folder"
                    ));
                }
                if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return fail(format!(
                        "version {version}: checksum of {file:?} is not 64 hex digits"
                    ));
                }
            }
            if !entry.files.contains_key(&entry.model_file) {
                return fail(format!(
                    "version {version}: model_file {:?} is not among its files",
                    entry.model_file
                ));
            }
        }
        if let Some(st) = &self.selftest {
            let tolerances = std::iter::once(("", st.tolerance("")))
                .chain(st.outputs.iter().map(|(k, v)| (k.as_str(), *v)));
            for (output, t) in tolerances {
                if !(t.atol.is_finite() && t.atol >= 0.0 && t.rtol.is_finite() && t.rtol >= 0.0) {
                    return fail(format!(
                        "selftest: atol and rtol must be finite and >= 0 (output {output:?})"
                    ));
                }
                if !output.is_empty() && !self.outputs.iter().any(|o| o.name == output) {
                    return fail(format!("selftest: {output:?} is not a declared output"));
                }
            }
            for (version, entry) in &self.versions {
                if !entry.files.contains_key(&st.file) {
                    return fail(format!(
                        "version {version}: the self-test file {:?} is not among its files",
                        st.file
                    ));
                }
                // The model file is taken by the engine: a self-test naming it was skipped
                // without a word (a red-team finding).
                let candle_config = self.candle.as_ref().map(|c| c.config.as_str());
                if st.file == entry.model_file || Some(st.file.as_str()) == candle_config {
                    return fail(format!(
                        "version {version}: the self-test file {:?} is the model's own file",
                        st.file
                    ));
                }
            }
        }
        if self.batching.max_batch_size > 1
            && self.inputs.iter().any(|i| i.shape.first() != Some(&-1))
        {
            return fail("dynamic batching (max_batch_size > 1) needs every input's first dimension to be -1".into());
        }
        if self.batching.queue_capacity == 0
            || self.batching.queue_bytes == 0
            || self.batching.max_rows_per_request == 0
            || self.batching.instances == 0
            || self.batching.instances > 64
        {
            return fail(
                "batching: queue_capacity, queue_bytes and max_rows_per_request must be at least 1, instances 1 to 64".into(),
            );
        }
        // Upper bounds: the queue's slots are allocated when the model loads (a capacity of
        // 2^60 was a panic there), and a batch or a wait beyond these is a mistake.
        let b = &self.batching;
        for (what, value, max) in [
            (
                "queue_capacity",
                b.queue_capacity as u64,
                MAX_QUEUE_CAPACITY,
            ),
            ("max_batch_size", b.max_batch_size as u64, MAX_BATCH_SIZE),
            (
                "max_rows_per_request",
                b.max_rows_per_request as u64,
                MAX_BATCH_SIZE,
            ),
            (
                "max_queue_delay_us",
                b.max_queue_delay_us,
                MAX_QUEUE_DELAY_US,
            ),
            (
                "preferred_batch_sizes (entries)",
                b.preferred_batch_sizes.len() as u64,
                64,
            ),
        ] {
            if value > max {
                return fail(format!("batching: {what} is {value}, more than {max}"));
            }
        }
        if let Some(p) = b
            .preferred_batch_sizes
            .iter()
            .find(|&&p| p == 0 || (b.max_batch_size > 1 && p > b.max_batch_size))
        {
            return fail(format!(
                "batching: preferred batch size {p} is not between 1 and max_batch_size ({})",
                b.max_batch_size
            ));
        }
        Ok(())
    }

    /// The inputs and outputs this bundle declares, in the given order of names (the model's).
    /// A candle architecture file's output labels and positive label, where it gives them,
    /// are the manifest's: it said "absent, present" where the manifest said "present,
    /// absent", and the manifest's were served without a word (a review's finding). What
    /// else is wrong with the file is the engine's to say (called after it loaded).
    pub fn check_candle_output(&self, config: &[u8]) -> Result<(), InvalidManifest> {
        #[derive(Deserialize)]
        struct File {
            output: Output,
        }
        #[derive(Deserialize)]
        struct Output {
            name: String,
            #[serde(default)]
            labels: Option<Vec<String>>,
            #[serde(default)]
            positive_label: Option<String>,
        }
        let Ok(file) = serde_json::from_slice::<File>(config) else {
            return Ok(());
        };
        let Some(declared) = self.outputs.iter().find(|o| o.name == file.output.name) else {
            return Ok(());
        };
        let fail = |what: &str, file: String, manifest: String| {
            Err(InvalidManifest(format!(
                "output {:?}: the candle architecture file gives {what} {file}, bundle.toml {manifest}",
                shown(&declared.name)
            )))
        };
        // Where the file gives them, bundle.toml gives the same (none there is not the same:
        // a re-attack's finding).
        if let Some(labels) = &file.output.labels
            && *labels != declared.labels
        {
            return fail(
                "labels",
                shown(&format!("{labels:?}")).into_owned(),
                shown(&format!("{:?}", declared.labels)).into_owned(),
            );
        }
        if let Some(positive) = &file.output.positive_label
            && Some(positive) != declared.positive_label.as_ref()
        {
            return fail(
                "positive_label",
                shown(&format!("{positive:?}")).into_owned(),
                shown(&format!("{:?}", declared.positive_label)).into_owned(),
            );
        }
        Ok(())
    }

    pub fn metadata_in_order(
        &self,
        model: &ModelMetadata,
    ) -> Result<ModelMetadata, InvalidManifest> {
        let pick = |what: &str, declared: Vec<TensorSpec>, order: &[TensorSpec]| {
            if declared.len() != order.len() {
                return Err(InvalidManifest(format!(
                    "{} {what}s declared but the model file has {} ({:?})",
                    declared.len(),
                    order.len(),
                    order.iter().map(|s| &s.name).collect::<Vec<_>>()
                )));
            }
            order
                .iter()
                .map(|m| {
                    declared
                        .iter()
                        .find(|d| d.name == m.name)
                        .cloned()
                        .ok_or_else(|| {
                            InvalidManifest(format!(
                                "the model file has {what} {:?}, which the bundle does not declare",
                                m.name
                            ))
                        })
                })
                .collect()
        };
        Ok(ModelMetadata {
            inputs: pick(
                "input",
                self.inputs
                    .iter()
                    .map(|i| TensorSpec {
                        name: i.name.clone(),
                        datatype: i.datatype,
                        shape: i.shape.clone(),
                    })
                    .collect(),
                &model.inputs,
            )?,
            outputs: pick(
                "output",
                self.outputs
                    .iter()
                    .map(|o| TensorSpec {
                        name: o.name.clone(),
                        datatype: o.datatype,
                        shape: o.shape.clone(),
                    })
                    .collect(),
                &model.outputs,
            )?,
        })
    }
}

impl Manifest {
    /// The documentation fields still holding a `TODO` placeholder (as `nightingale models
    /// init` writes them), by their path in `bundle.toml`: `description`, `intended_use.*`,
    /// `provenance.*`. `models check` warns about each; they do not stop a bundle serving.
    pub fn unfilled_fields(&self) -> Vec<&'static str> {
        let todo = |s: &str| s.trim_start().starts_with(crate::init::TODO_MARKER);
        let u = &self.intended_use;
        let p = &self.provenance;
        [
            ("description", todo(&self.description)),
            ("intended_use.summary", todo(&u.summary)),
            ("intended_use.users", todo(&u.users)),
            (
                "intended_use.limitations",
                u.limitations.iter().any(|l| todo(l)),
            ),
            ("provenance.training_data", todo(&p.training_data)),
            ("provenance.data_licence", todo(&p.data_licence)),
            ("provenance.model_licence", todo(&p.model_licence)),
            ("provenance.training_script", todo(&p.training_script)),
        ]
        .into_iter()
        .filter_map(|(field, unfilled)| unfilled.then_some(field))
        .collect()
    }
}

/// A version folder name: a positive integer without sign or leading zeros, of at most 19
/// digits.
pub fn parse_version(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok().filter(|&v| v > 0)
}

/// A `/`-separated path of plain names: no `..` or `.`, no leading `/`, no empty parts, no
/// backslash or NUL. Hidden names (`.x`) are allowed: every file of a version folder, hidden
/// or not, must be listed and checksummed.
fn safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 512
        && p.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && !part.contains('\\')
                && !part.contains('\0')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
format_version = 1
name = "m"
task = "tabular-risk"
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 2]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 2]
labels = ["a", "b"]
[versions.1.files]
"model.onnx" = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

    /// Red-team finding: labels that did not match the columns (one label on two columns, a
    /// label twice) made `positive_label` pick another column than the one it names.
    #[test]
    fn labels_name_each_column_once_and_threshold_names_are_unique() {
        let with = |labels: &str| MINIMAL.replace("labels = [\"a\", \"b\"]", labels);
        for (labels, why) in [
            ("labels = [\"a\"]", "has 1 labels for 2 columns"),
            (
                "labels = [\"a\", \"b\", \"c\"]",
                "has 3 labels for 2 columns",
            ),
            ("labels = [\"a\", \"a\"]", "label \"a\" is given twice"),
        ] {
            let e = Manifest::parse(&with(labels)).unwrap_err().to_string();
            assert!(e.contains(why), "{labels}: {e}");
        }
        // An open last dimension is not checked (the labels say how many columns there are).
        let open = with("labels = [\"a\", \"b\", \"c\"]").replace(
            "name = \"y\"\ndatatype = \"FP32\"\nshape = [-1, 2]",
            "name = \"y\"\ndatatype = \"FP32\"\nshape = [-1, -1]",
        );
        assert!(Manifest::parse(&open).is_ok());
        let threshold = |name: &str| {
            format!(
                "[[thresholds]]\nname = \"{name}\"\noutput = \"y\"\nlabel = \"b\"\nvalue = 0.5\n"
            )
        };
        let twice = format!("{MINIMAL}{}{}", threshold("high"), threshold("high"));
        let e = Manifest::parse(&twice).unwrap_err().to_string();
        assert!(e.contains("threshold \"high\" is given twice"), "{e}");
        let two = format!("{MINIMAL}{}{}", threshold("high"), threshold("low"));
        assert!(Manifest::parse(&two).is_ok());
    }

    #[test]
    fn a_self_test_of_the_model_file_is_refused() {
        let text = format!("{MINIMAL}[selftest]\nfile = \"model.onnx\"\natol = 0.0\nrtol = 0.0\n");
        let e = Manifest::parse(&text).unwrap_err().to_string();
        assert!(e.contains("is the model's own file"), "{e}");
    }

    #[test]
    fn a_finding_code_is_checked_where_it_is_declared() {
        let with = |code: &str| {
            MINIMAL.replace(
                "labels = [\"a\", \"b\"]",
                &format!("labels = [\"a\", \"b\"]\nfinding_code = {code}"),
            )
        };
        let m = Manifest::parse(&with(
            r#"{ scheme = "SCT", value = "27925004", meaning = "Nodule" }"#,
        ))
        .unwrap();
        assert_eq!(
            m.outputs[0].finding_code,
            Some(ConceptCode {
                scheme: "SCT".into(),
                value: "27925004".into(),
                meaning: "Nodule".into()
            })
        );
        // A private scheme's value need not be a number; a long one is allowed (Long Code Value).
        assert!(
            Manifest::parse(&with(&format!(
                r#"{{ scheme = "99LOCAL", value = "{}", meaning = "x" }}"#,
                "v".repeat(64)
            )))
            .is_ok()
        );
        for (code, why) in [
            // One digit mistyped: the check digit catches it.
            (
                r#"{ scheme = "SCT", value = "27925005", meaning = "Nodule" }"#,
                "check digit",
            ),
            (
                r#"{ scheme = "SCT", value = "Nodule", meaning = "Nodule" }"#,
                "6-18 digits",
            ),
            (
                r#"{ scheme = "SCT ", value = "27925004", meaning = "Nodule" }"#,
                "coding scheme designator",
            ),
            (
                r#"{ scheme = "99X", value = "a\\b", meaning = "x" }"#,
                "code value",
            ),
            (
                r#"{ scheme = "99X", value = "a", meaning = "" }"#,
                "code meaning",
            ),
            (
                r#"{ scheme = "99X", value = "a", meaning = " x" }"#,
                "code meaning",
            ),
            (
                r#"{ scheme = "99X", value = "a", meaning = "x\ny" }"#,
                "code meaning",
            ),
            (
                r#"{ scheme = "99X", value = "a", meaning = "x", version = "1" }"#,
                "unknown field",
            ),
        ] {
            let e = Manifest::parse(&with(code)).unwrap_err().to_string();
            assert!(e.contains(why), "{code}: {e}");
            assert!(
                e.contains("finding_code") || why == "unknown field",
                "{code}: {e}"
            );
        }
        let e = Manifest::parse(&with(&format!(
            r#"{{ scheme = "99X", value = "a", meaning = "{}" }}"#,
            "m".repeat(65)
        )))
        .unwrap_err()
        .to_string();
        assert!(e.contains("code meaning"), "{e}");
    }

    #[test]
    fn a_reason_quoting_a_huge_value_is_cut() {
        let text = MINIMAL.replace(
            "name = \"m\"",
            &format!("name = \"{}\"", "N".repeat(200_000)),
        );
        let e = Manifest::parse(&text).unwrap_err().to_string();
        assert!(e.len() < 1100, "{}", e.len());
        assert!(e.starts_with("name \"NNN"), "{}", &e[..40]);
        assert!(e.ends_with(" bytes cut)"), "{}", &e[e.len() - 40..]);
    }

    #[test]
    fn batching_values_are_bounded() {
        for (line, why) in [
            (
                "queue_capacity = 1152921504606846976",
                "queue_capacity is 1152921504606846976, more than 1048576",
            ),
            (
                "max_batch_size = 4294967296",
                "max_batch_size is 4294967296",
            ),
            (
                "max_queue_delay_us = 3600000000",
                "max_queue_delay_us is 3600000000",
            ),
            (
                "max_rows_per_request = 9999999999",
                "max_rows_per_request is 9999999999",
            ),
            ("queue_capacity = 0", "at least 1"),
            (
                "max_batch_size = 8\npreferred_batch_sizes = [4, 16]",
                "preferred batch size 16",
            ),
            (
                "max_batch_size = 8\npreferred_batch_sizes = [0]",
                "preferred batch size 0",
            ),
        ] {
            let text = MINIMAL.replace(
                "[versions.1.files]",
                &format!("[batching]\n{line}\n[versions.1.files]"),
            );
            let e = Manifest::parse(&text).unwrap_err().to_string();
            assert!(e.contains(why), "{line}: {e}");
        }
        let text = MINIMAL.replace(
            "[versions.1.files]",
            "[batching]\nmax_batch_size = 8\npreferred_batch_sizes = [4, 8]\nqueue_capacity = 1048576\n[versions.1.files]",
        );
        assert_eq!(
            Manifest::parse(&text).unwrap().batching.queue_capacity,
            1 << 20
        );
    }

    #[test]
    fn validation_gates_are_checked() {
        let with = |gate: &str| {
            format!(
                "{MINIMAL}\n[[thresholds]]\nname = \"t\"\noutput = \"y\"\nlabel = \"a\"\nvalue = 0.5\n{gate}"
            )
        };
        let good = with(
            "[[validation.gate]]\nmetric = \"auroc\"\nbound = \"ci_lower\"\nmin = 0.8\n\
             [[validation.gate]]\nmetric = \"sensitivity\"\nthreshold = \"t\"\nmin = 0.9\nversions = [1]\n\
             [[validation.gate]]\nmetric = \"calibration_slope\"\nmin = 0.5\nmax = 2.0\n",
        );
        let m = Manifest::parse(&good).unwrap();
        let v = m.validation.as_ref().unwrap();
        assert_eq!(v.gate.len(), 3);
        assert_eq!(v.gate[0].bound, GateBound::CiLower);
        assert_eq!(v.gate[1].label(), "sensitivity@t");
        assert_eq!(v.gate[0].label(), "auroc.ci_lower");
        assert_eq!(v.gate_for(Some(2)).len(), 2);
        assert_eq!(v.gate_for(Some(1)).len(), 3);
        assert_eq!((v.min_positives(), v.min_negatives()), (10, 10));
        let floors = Manifest::parse(&with(
            "[validation]\nmin_positives = 8\nmin_negatives = 30\n\
             [[validation.gate]]\nmetric = \"auroc\"\nmin = 0.6\n",
        ))
        .unwrap();
        let v = floors.validation.as_ref().unwrap();
        assert_eq!((v.min_positives(), v.min_negatives()), (8, 30));
        for floor in ["min_positives = 1", "min_negatives = 0"] {
            let e = Manifest::parse(&with(&format!(
                "[validation]\n{floor}\n[[validation.gate]]\nmetric = \"auroc\"\nmin = 0.6\n"
            )))
            .unwrap_err()
            .to_string();
            assert!(e.contains("at least 2"), "{floor}: {e}");
        }
        assert_eq!(v.max_unusable_fraction(), DEFAULT_MAX_UNUSABLE_FRACTION);
        for share in ["-0.1", "1.5", "nan"] {
            let e = Manifest::parse(&with(&format!(
                "[validation]\nmax_unusable_fraction = {share}\n[[validation.gate]]\nmetric = \"auroc\"\nmin = 0.6\n"
            )))
            .unwrap_err()
            .to_string();
            assert!(e.contains("a fraction between 0 and 1"), "{share}: {e}");
        }
        for (gate, why) in [
            ("metric = \"auc\"\nmin = 0.5", "is not one of"),
            ("metric = \"sensitivity\"\nmin = 0.5", "needs `threshold`"),
            (
                "metric = \"sensitivity\"\nthreshold = \"nope\"\nmin = 0.5",
                "not among [[thresholds]]",
            ),
            (
                "metric = \"auroc\"\nthreshold = \"t\"\nmin = 0.5",
                "not measured at a threshold",
            ),
            (
                "metric = \"ece\"\nbound = \"ci_upper\"\nmax = 0.1",
                "no confidence interval",
            ),
            ("metric = \"auroc\"", "needs `min`, `max` or both"),
            ("metric = \"auroc\"\nmin = 0.9\nmax = 0.8", "above max"),
            ("metric = \"auroc\"\nmin = nan", "finite"),
            (
                "metric = \"auroc\"\nmin = 0.5\nversions = [7]",
                "version 7 is not among",
            ),
            ("metric = \"auroc\"\nmin = 0.5\nbogus = 1", "unknown field"),
        ] {
            let e = Manifest::parse(&with(&format!("[[validation.gate]]\n{gate}\n")))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{gate}: {e}");
        }
    }

    #[test]
    fn candle_bundles_are_checked() {
        let zeros = "0".repeat(64);
        let candle = |platform: &str, section: &str, model_file: &str, extra: &str| {
            MINIMAL
                .replace(
                    "task = \"tabular-risk\"\n",
                    &format!("task = \"tabular-risk\"\nplatform = \"{platform}\"\n"),
                )
                .replace(
                    "[versions.1.files]\n\"model.onnx\"",
                    &format!(
                        "{section}\n{extra}\n[versions.1]\nmodel_file = \"{model_file}\"\n[versions.1.files]\n\"architecture.json\" = \"{zeros}\"\n\"model.safetensors\" = \"{zeros}\"\n\"model.onnx\""
                    ),
                )
        };
        let section = "[candle]\narchitecture = \"conv-classifier\"";
        let m = Manifest::parse(&candle("candle", section, "model.safetensors", "")).unwrap();
        let c = m.candle.as_ref().unwrap();
        assert_eq!(
            (c.architecture.as_str(), c.config.as_str()),
            ("conv-classifier", "architecture.json")
        );
        let explain = "[explain]\nmethods = [\"grad_cam\", \"integrated_gradients\"]";
        assert!(Manifest::parse(&candle("candle", section, "model.safetensors", explain)).is_ok());
        for (text, why) in [
            (
                candle("candle", "", "model.safetensors", ""),
                "needs a [candle] section",
            ),
            (
                candle("onnx", section, "model.onnx", ""),
                "a [candle] section needs platform = \"candle\"",
            ),
            (
                candle("candle", section, "model.onnx", ""),
                "must name the safetensors weights",
            ),
            (
                candle(
                    "candle",
                    "[candle]\narchitecture = \"conv-classifier\"\nconfig = \"other.json\"",
                    "model.safetensors",
                    "",
                ),
                "\"other.json\" is not among its files",
            ),
            (
                candle("tflite", "", "model.onnx", ""),
                "platform \"tflite\"",
            ),
            (
                format!("{MINIMAL}\n{explain}\n"),
                "only a platform = \"candle\" bundle gives",
            ),
        ] {
            let e = Manifest::parse(&text).unwrap_err().to_string();
            assert!(e.contains(why), "{why:?} not in {e:?}\n{text}");
        }
    }

    #[test]
    fn minimal_manifest_parses_with_defaults() {
        let m = Manifest::parse(MINIMAL).unwrap();
        assert_eq!(m.backend, BackendPreference::Any);
        assert_eq!(m.version_policy.select(&[1, 3, 2]), vec![3]);
        assert_eq!(m.batching.instances, 1);
    }

    /// Red-team finding: a feature named twice passed `models check`, and `validate` then
    /// filled both slots from one column (the other listed as ignored), without a word.
    #[test]
    fn a_feature_named_twice_is_refused() {
        let twice = "[[inputs.features]]\nname = \"a\"\n[[inputs.features]]\nname = \"a\"\n";
        let m = MINIMAL.replace(
            "shape = [-1, 2]\n[[outputs]]",
            &format!("shape = [-1, 2]\n{twice}[[outputs]]"),
        );
        assert_ne!(m, MINIMAL);
        let e = Manifest::parse(&m).unwrap_err().to_string();
        assert!(e.contains("lists the feature \"a\" twice"), "{e}");
    }

    #[test]
    fn explain_sections_are_checked() {
        let features = "[[inputs.features]]\nname = \"a\"\n[[inputs.features]]\nname = \"b\"\n";
        let tabular = MINIMAL.replace(
            "shape = [-1, 2]\n[[outputs]]",
            &format!("shape = [-1, 2]\n{features}[[outputs]]"),
        );
        let with = |base: &str, explain: &str| format!("{base}\n[explain]\n{explain}\n");
        let m = Manifest::parse(&with(
            &tabular,
            "methods = [\"kernel_shap\", \"linear\"]\nbackground = [[1.0, 2.0], [3.0, 4.0]]",
        ))
        .unwrap();
        let e = m.explain.unwrap();
        assert_eq!(e.max_forward_passes, DEFAULT_EXPLAIN_FORWARD_PASSES);
        assert_eq!(e.background.len(), 2);
        let m = Manifest::parse(&with(
            MINIMAL,
            "methods = [\"occlusion\"]\nmax_forward_passes = 100",
        ))
        .unwrap();
        assert_eq!(m.explain.unwrap().max_forward_passes, 100);
        for (base, explain, why) in [
            (MINIMAL, "methods = [\"lime\"]", "unknown method"),
            (
                MINIMAL,
                "methods = []\nmax_forward_passes = 0",
                "max_forward_passes must be",
            ),
            (
                MINIMAL,
                "methods = []\nmax_forward_passes = 1048577",
                "max_forward_passes must be",
            ),
            (MINIMAL, "methods = [\"kernel_shap\"]", "needs a background"),
            (
                MINIMAL,
                "methods = []\nbackground = [[1.0, 2.0]]",
                "needs exactly one input",
            ),
            (
                &tabular,
                "methods = []\nbackground = [[1.0]]",
                "1 values for 2 features",
            ),
            (
                &tabular,
                "methods = []\nbackground = [[1.0, nan]]",
                "non-finite",
            ),
            (MINIMAL, "methods = []\nbudget = 3", "unknown field"),
        ] {
            let err = Manifest::parse(&with(base, explain))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{explain:?}: {err}");
        }
    }

    #[test]
    fn feature_sources_and_attribution() {
        let with = |features: &str, attribution: &str| {
            MINIMAL.replace(
                "shape = [-1, 2]\n[[outputs]]",
                &format!("shape = [-1, 2]\n{features}\n{attribution}\n[[outputs]]"),
            )
        };
        let good_features = r#"
[[inputs.features]]
name = "age"
unit = "a"
fhir = "patient-age"
[[inputs.features]]
name = "sepsis"
unit = "1"
fhir = "condition"
conditions = ["http://snomed.info/sct|91302008"]
"#;
        // [attribution] is a top-level table: put it after the versions.
        let text = format!(
            "{}\n[attribution]\nreference = \"training-mean\"\nmeans = [60.5, 0.25]\n",
            with(good_features, "")
        );
        let m = Manifest::parse(&text).unwrap();
        assert_eq!(m.inputs[0].features[0].fhir, Some(FhirSource::PatientAge));
        assert_eq!(m.attribution.unwrap().means, vec![60.5, 0.25]);
        let bad = [
            (
                good_features.replace(
                    "fhir = \"patient-age\"",
                    "fhir = \"patient-age\"\ncode = \"http://loinc.org|30525-0\"",
                ),
                "exclusive",
            ),
            (
                good_features.replace("fhir = \"patient-age\"", "fhir = \"horoscope\""),
                "unknown variant",
            ),
            (
                good_features.replace("conditions = [\"http://snomed.info/sct|91302008\"]", ""),
                "conditions list",
            ),
            (
                good_features.replace("http://snomed.info/sct|91302008", "91302008"),
                "SYSTEM|CODE",
            ),
            (
                good_features.replace("unit = \"a\"", "unit = \"mo\""),
                "unit must be",
            ),
            (
                good_features.replace(
                    "fhir = \"patient-age\"",
                    "fhir = \"patient-age\"\nencounter_class = [\"EMER\"]",
                ),
                "only for",
            ),
            (
                good_features.replace("fhir = \"condition\"", "fhir = \"condition\"\nsource = 1"),
                "unknown field",
            ),
            (
                good_features.replace(
                    "fhir = \"patient-age\"",
                    "fhir = \"patient-age\"\nlook_back_hours = 24.0",
                ),
                "for code (Observation) features",
            ),
            (
                good_features.replace(
                    "fhir = \"patient-age\"",
                    "code = \"http://loinc.org|30525-0\"\nlook_back_hours = -1.0",
                ),
                "must be above 0",
            ),
            (
                good_features.replace(
                    "fhir = \"patient-age\"",
                    "code = \"http://loinc.org|30525-0\"\nmolar_mass = 0.0",
                ),
                "positive g/mol",
            ),
        ];
        for (features, why) in bad {
            let err = Manifest::parse(&with(&features, "")).unwrap_err();
            assert!(err.0.contains(why), "{why}: {}", err.0);
        }
        for (attribution, why) in [
            ("means = [1.0]\nreference = \"training-mean\"", "2 features"),
            (
                "means = [1.0, 2.0]\nreference = \"median\"",
                "unknown variant",
            ),
            (
                "means = [1.0, 2.0]\nreference = \"training-mean\"\nextra = 1",
                "unknown field",
            ),
        ] {
            let text = format!(
                "{}\n[attribution]\n{attribution}\n",
                with(good_features, "")
            );
            let err = Manifest::parse(&text).unwrap_err();
            assert!(err.0.contains(why), "{why}: {}", err.0);
        }
    }

    #[test]
    fn rejects_bad_manifests() {
        let cases = [
            (MINIMAL.replace("name = \"m\"", "name = \"../m\""), "name"),
            (
                MINIMAL.replace("format_version = 1", "format_version = 9"),
                "format_version",
            ),
            (
                MINIMAL.replace("\"model.onnx\" = \"0000", "\"../model.onnx\" = \"0000"),
                "relative path",
            ),
            (
                MINIMAL.replace("[versions.1.files]", "[versions.01.files]"),
                "positive integer",
            ),
            (
                MINIMAL.replace("task = \"tabular-risk\"", "task = \"astrology\""),
                "unknown variant",
            ),
            (
                MINIMAL.replace(
                    "shape = [-1, 2]\n[[outputs]]",
                    "shape = [-1, 2]\nshapes = 1\n[[outputs]]",
                ),
                "unknown field",
            ),
            (
                format!("{MINIMAL}\n[[thresholds]]\nname = \"t\"\noutput = \"z\"\nvalue = 0.5\n"),
                "unknown output",
            ),
        ];
        for (text, needle) in cases {
            let err = Manifest::parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn version_policies() {
        let p = |policy, latest, versions: Vec<u64>| VersionPolicy {
            policy,
            latest,
            versions,
        };
        assert_eq!(
            p(PolicyKind::Latest, 2, vec![]).select(&[1, 2, 3]),
            vec![2, 3]
        );
        assert_eq!(p(PolicyKind::All, 1, vec![]).select(&[3, 1]), vec![1, 3]);
        assert_eq!(
            p(PolicyKind::Specific, 1, vec![1, 7]).select(&[1, 2]),
            vec![1]
        );
    }

    #[test]
    fn todo_fields_are_reported() {
        let m = Manifest::parse(MINIMAL).unwrap();
        assert!(m.unfilled_fields().is_empty());
        let text = format!(
            "{}\n[intended_use]\nsummary = \"TODO: fill\"\nlimitations = [\"ok\", \"TODO: x\"]\n",
            MINIMAL.replace("task = ", "description = \"TODO: what\"\ntask = ")
        );
        let m = Manifest::parse(&text).unwrap();
        assert_eq!(
            m.unfilled_fields(),
            [
                "description",
                "intended_use.summary",
                "intended_use.limitations"
            ]
        );
    }

    #[test]
    fn version_names() {
        assert_eq!(parse_version("12"), Some(12));
        for bad in ["0", "01", "-1", "", "1a", "99999999999999999999"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }
}
