//! CDS services declared in configuration (`[[cds.services]]`), validated once into
//! [`Services`]; a NEWS2 service answers a [`HookRequest`] with its card.
//!
//! ```toml
//! [[cds.services]]
//! id = "nightingale-news2"
//! hook = "patient-view"
//! title = "NEWS2 early warning score"
//! description = "National Early Warning Score 2 from the latest vital signs"
//! kind = "news2"
//! look_back_minutes = 720
//! scale2_conditions = ["http://example.org/local-codes|spo2-target-88-92"]
//! [cds.services.wording]
//! footer = "Escalate per the trust's deteriorating patient policy."
//! ```
//!
//! With no `[[cds.services]]`, [`CdsSection::default`] offers the built-in NEWS2 service
//! (id `nightingale-news2`, hook `patient-view`) with the prefetch templates
//! [`news2_prefetch`].

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;

use nightingale_models::manifest::{FeatureSpec, FhirSource};

use crate::cards::{Wording, news2_card};
use crate::fhir::{CodeableConcept, Limits, Resource, Resources, SystemCode, Unreadable};
use crate::hooks::{CdsResponse, HookRequest, RequestError, ServiceDescriptor, render_prefetch};
use crate::news2::{Assessment, News2Settings, assess, default_pregnancy_conditions};
use crate::vitals::VitalsOptions;

/// What a service computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// NEWS2 from vital signs.
    News2,
    /// Risk-model cards from model bundles (served by the root package).
    Risk,
    /// The DICOM pipeline's imaging results of the patient (served by the root package,
    /// with `--cds-imaging-identifier-system`): one service, so that an EHR calling every
    /// patient-view service shows each finding once.
    Imaging,
}

/// One `[[cds.services]]` entry, as written.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The `{id}` of `POST /cds-services/{id}`: letters, digits, `-`, `_`, `.`.
    pub id: String,
    /// `patient-view`, `order-select`, `order-sign`, …
    pub hook: String,
    pub title: Option<String>,
    pub description: String,
    pub kind: ServiceKind,
    /// Risk services: the model bundles to run.
    #[serde(default)]
    pub bundles: Vec<String>,
    /// Risk services: operating thresholds by bundle (each in (0, 1)), overriding the
    /// bundle's own.
    #[serde(default)]
    pub thresholds: BTreeMap<String, f64>,
    /// How far back vital signs are read, in minutes (default 720: 12 hours).
    pub look_back_minutes: Option<u32>,
    /// Active Conditions (`system|code`) that put the patient on SpO2 scale 2.
    #[serde(default)]
    pub scale2_conditions: Vec<SystemCode>,
    /// Active Conditions (`system|code`) meaning pregnancy (default SNOMED 77386006,
    /// 72892002).
    pub pregnancy_conditions: Option<Vec<SystemCode>>,
    /// Prefetch templates (default: [`news2_prefetch`] for NEWS2 services, none for risk).
    pub prefetch: Option<BTreeMap<String, String>>,
    pub usage_requirements: Option<String>,
    #[serde(default)]
    pub wording: Wording,
}

/// The `[cds]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdsSection {
    #[serde(default = "default_services")]
    pub services: Vec<ServiceConfig>,
}

impl Default for CdsSection {
    fn default() -> Self {
        CdsSection {
            services: default_services(),
        }
    }
}

/// The id of the built-in NEWS2 service.
pub const DEFAULT_NEWS2_ID: &str = "nightingale-news2";

/// The id of the built-in imaging-results service.
pub const DEFAULT_IMAGING_ID: &str = "nightingale-imaging-results";

/// The prefetch of an imaging-results service: the Patient, for its identifier.
pub fn imaging_prefetch() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "patient".to_owned(),
        "Patient/{{context.patientId}}".to_owned(),
    )])
}

/// The built-in imaging-results service: id `nightingale-imaging-results`, `patient-view`.
pub fn builtin_imaging_service() -> ServiceConfig {
    ServiceConfig {
        id: DEFAULT_IMAGING_ID.to_owned(),
        hook: "patient-view".to_owned(),
        title: Some("AI imaging results".to_owned()),
        description: "Findings of the imaging AI models on this patient's studies (the DICOM pipeline's results, unreviewed), newest first, with when the model read the series and whether the full result reached PACS".to_owned(),
        kind: ServiceKind::Imaging,
        bundles: vec![],
        thresholds: BTreeMap::new(),
        look_back_minutes: None,
        scale2_conditions: vec![],
        pregnancy_conditions: None,
        usage_requirements: usage_requirements(&imaging_prefetch()),
        prefetch: Some(imaging_prefetch()),
        wording: Wording::default(),
    }
}

fn default_services() -> Vec<ServiceConfig> {
    vec![ServiceConfig {
        id: DEFAULT_NEWS2_ID.to_owned(),
        hook: "patient-view".to_owned(),
        title: Some("NEWS2 early warning score".to_owned()),
        description: "National Early Warning Score 2 (Royal College of Physicians, 2017) from the patient's latest vital signs, with the clinical response the chart recommends".to_owned(),
        kind: ServiceKind::News2,
        bundles: vec![],
        thresholds: BTreeMap::new(),
        look_back_minutes: None,
        scale2_conditions: vec![],
        pregnancy_conditions: None,
        prefetch: None,
        usage_requirements: usage_requirements(&news2_prefetch()),
        wording: Wording::default(),
    }]
}

/// What the caller fetched for [`Service::missing_prefetch`]: the resources it read (by
/// key), and the keys whose fetch failed (the FHIR server failed, timed out, or answered what
/// is not FHIR). A key that failed is not "nothing recorded": what it would have held is
/// unknown ([`crate::fhir::Resources::add_unread_search`]).
#[derive(Clone, Debug, Default)]
pub struct Fetched {
    pub resources: Vec<(String, Resource)>,
    pub failed: Vec<String>,
}

impl From<Vec<(String, Resource)>> for Fetched {
    fn from(resources: Vec<(String, Resource)>) -> Self {
        Fetched {
            resources,
            failed: vec![],
        }
    }
}

/// The search a prefetch template asks for, as unread: its resource type (the template's
/// first path segment) and, for an Observation search by `code`, those codes (`system|code`,
/// comma-separated; any code otherwise).
fn unread_search(template: &str) -> Unreadable {
    let path = template.split_once('?').map_or(template, |(p, _)| p);
    let resource_type = match path.split('/').next().unwrap_or_default() {
        "Observation" => "Observation",
        "Condition" => "Condition",
        "Encounter" => "Encounter",
        "Patient" => "Patient",
        _ => "Other",
    };
    Unreadable::search(resource_type, search_codes(template))
}

/// The resource type a search template returns as matches: `Type?…`, `Type/$op?…` (as
/// `Observation/$lastn`), or a compartment's `Patient/{id}/Type?…`; `None` when it cannot be
/// told (another form, an operation over several types such as `$everything`).
fn searched_type(template: &str) -> Option<&str> {
    let path = template.split_once('?').map_or(template, |(p, _)| p);
    let is_type = |s: &str| {
        s.starts_with(|c: char| c.is_ascii_uppercase())
            && s.bytes().all(|b| b.is_ascii_alphanumeric())
    };
    match path.split('/').collect::<Vec<_>>().as_slice() {
        [t] if is_type(t) => Some(t),
        [t, op] if is_type(t) && *op == "$lastn" => Some(t),
        ["Patient", _, t] if is_type(t) => Some(t),
        _ => None,
    }
}

/// The resource types the templates of a prefetch ask for, in the order Patient,
/// Observation, Condition, Encounter, then others by name.
fn prefetch_types(prefetch: &BTreeMap<String, String>) -> Vec<String> {
    let mut types: Vec<String> = vec![];
    for template in prefetch.values() {
        let path = template
            .split_once('?')
            .map_or(template.as_str(), |(p, _)| p);
        let t = searched_type(template)
            .or_else(|| path.split('/').next())
            .filter(|t| !t.is_empty());
        if let Some(t) = t
            && !types.iter().any(|k| k == t)
        {
            types.push(t.to_owned());
        }
    }
    let rank = |t: &str| {
        ["Patient", "Observation", "Condition", "Encounter"]
            .iter()
            .position(|k| *k == t)
            .unwrap_or(4)
    };
    types.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    types
}

/// A discovery `usageRequirements` naming the resource types `prefetch` asks for ("Read
/// access to the patient's Patient and Observation resources"); `None` for no prefetch. It
/// was written by hand, and named Condition and Encounter for a service that reads neither
/// (a review's finding).
pub fn usage_requirements(prefetch: &BTreeMap<String, String>) -> Option<String> {
    let types = prefetch_types(prefetch);
    let list = match types.as_slice() {
        [] => return None,
        [only] => only.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    };
    Some(format!("Read access to the patient's {list} resources"))
}

/// The codes an Observation search template asks for (`code=system|code,...`); `None` when
/// it does not search by code, or names a code without its system (which matches the code
/// in any system).
fn search_codes(template: &str) -> Option<Vec<CodeableConcept>> {
    let (path, query) = template.split_once('?')?;
    if path != "Observation" {
        return None;
    }
    query
        .split('&')
        .find_map(|p| p.strip_prefix("code="))
        .and_then(|list| {
            list.split(',')
                .map(|token| {
                    let (system, code) = token.split_once('|')?;
                    (!system.is_empty()).then(|| CodeableConcept::of(system, code))
                })
                .collect()
        })
}

/// The prefetch templates of a NEWS2 service.
pub fn news2_prefetch() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "patient".to_owned(),
            "Patient/{{context.patientId}}".to_owned(),
        ),
        (
            "vitals".to_owned(),
            "Observation?patient={{context.patientId}}&category=vital-signs&_sort=-date&_count=100"
                .to_owned(),
        ),
        (
            "conditions".to_owned(),
            "Condition?patient={{context.patientId}}".to_owned(),
        ),
        // The level of consciousness (ACVPU) is not one of the FHIR vital-signs profiles:
        // EHRs file it under `survey` or `exam`, where the vitals search does not reach (NEWS2
        // was "not calculated: missing Consciousness" though one was charted: a red-team
        // finding). Searched by its codes.
        (
            "consciousness".to_owned(),
            "Observation?patient={{context.patientId}}&code=http://loinc.org|67775-7,http://snomed.info/sct|1104441000000107&_sort=-date&_count=10"
                .to_owned(),
        ),
        // NEWS2 is not validated in pregnancy: the latest pregnancy-status Observation,
        // which US Core and IPS file under `social-history`, not `vital-signs` (the vitals
        // search alone never returned it: a red-team finding).
        (
            "pregnancy".to_owned(),
"Observation?patient={{context.patientId}}&code=http://loinc.org|82810-3,http://loinc.org|11449-6&_sort=-date&_count=1"
                .to_owned(),
        ),
    ])
}

/// LOINC systolic and diastolic blood pressure, as features name them.
pub(crate) const BP_COMPONENTS: [&str; 2] = ["http://loinc.org|8480-6", "http://loinc.org|8462-4"];
/// LOINC blood pressure panels (85354-9, and 55284-4 "systolic and diastolic") that carry
/// them as components.
pub(crate) const BP_PANELS: [&str; 2] = ["http://loinc.org|85354-9", "http://loinc.org|55284-4"];

/// Whether `c` codes one of the [`BP_PANELS`].
pub(crate) fn is_bp_panel(c: &CodeableConcept) -> bool {
    BP_PANELS
        .iter()
        .filter_map(|p| p.split_once('|'))
        .any(|(system, panel)| c.has(system, panel))
}

/// The prefetch templates a risk service needs for these features: the Patient (age, sex),
/// the Observations of the declared codes, the active Conditions, the in-progress Encounters.
pub fn risk_prefetch<'a>(
    features: impl IntoIterator<Item = &'a FeatureSpec>,
) -> BTreeMap<String, String> {
    let mut codes = BTreeSet::new();
    let (mut patient, mut conditions, mut encounter) = (false, false, false);
    for f in features {
        if let Some(c) = &f.code {
            codes.insert(c.clone());
            // The codes charting the same vital sign are read too: searched for.
            if let Some((system, code)) = c.split_once('|') {
                codes.extend(
                    crate::risk::codes_of(&SystemCode::new(system, code))
                        .into_iter()
                        .map(|c| format!("{}|{}", c.system, c.code)),
                );
            }
            // Blood pressures are often charted as a panel with the pressures as its
            // components; FHIR R4's `code` search matches `Observation.code` only, so the
            // panels' own codes are searched for too (`combo-code` would match components,
            // but not every FHIR server supports it).
            if BP_COMPONENTS.contains(&c.as_str()) {
                codes.extend(BP_PANELS.iter().map(|p| (*p).to_owned()));
            }
        }
        match f.fhir {
            Some(FhirSource::PatientAge | FhirSource::PatientFemale) => patient = true,
            Some(FhirSource::Condition) => conditions = true,
            Some(FhirSource::EncounterClass) => encounter = true,
            None => {}
        }
    }
    let mut out = BTreeMap::new();
    if patient {
        out.insert(
            "patient".to_owned(),
            "Patient/{{context.patientId}}".to_owned(),
        );
    }
    if !codes.is_empty() {
        out.insert(
            "observations".to_owned(),
            format!(
                "Observation?patient={{{{context.patientId}}}}&code={}&_sort=-date&_count=100",
                codes.into_iter().collect::<Vec<_>>().join(",")
            ),
        );
    }
    if conditions {
        out.insert(
            "conditions".to_owned(),
            // Every Condition of the patient, whatever its status: the mapping reads the
            // status itself (`recurrence` and `relapse` count as active, none as unknown),
            // and a search by `clinical-status=active` matches that exact code only (a
            // recurring sepsis was "no infection": a red-team finding).
            "Condition?patient={{context.patientId}}".to_owned(),
        );
    }
    if encounter {
        out.insert(
            "encounters".to_owned(),
            // Every R4 status of an encounter under way: an emergency patient `triaged` or
            // `arrived` was "no current encounter" (a red-team finding).
            "Encounter?patient={{context.patientId}}&status=arrived,triaged,in-progress,onleave"
                .to_owned(),
        );
    }
    out
}

/// The built-in risk service of one bundle: id `nightingale-{bundle}`, hook `patient-view`.
pub fn builtin_risk_service(
    bundle: &str,
    description: &str,
    prefetch: BTreeMap<String, String>,
) -> ServiceConfig {
    ServiceConfig {
        id: format!("nightingale-{bundle}"),
        hook: "patient-view".to_owned(),
        title: Some(format!("{bundle} risk model")),
        description: description.to_owned(),
        kind: ServiceKind::Risk,
        bundles: vec![bundle.to_owned()],
        thresholds: BTreeMap::new(),
        look_back_minutes: None,
        scale2_conditions: vec![],
        pregnancy_conditions: None,
        usage_requirements: usage_requirements(&prefetch),
        prefetch: Some(prefetch),
        wording: Wording::default(),
    }
}

/// Why the CDS configuration is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cds service id {id:?}: {reason}")]
    Id { id: String, reason: &'static str },
    #[error("cds service id {id:?} is declared twice")]
    DuplicateId { id: String },
    #[error(
        "cds service {id:?}: hook {hook:?} is not a hook name (lower-case letters, digits, '-')"
    )]
    Hook { id: String, hook: String },
    #[error("cds service {id:?}: {reason}")]
    Invalid { id: String, reason: &'static str },
    #[error("cds service {id:?}: threshold of bundle {bundle:?} must lie in (0, 1)")]
    Threshold { id: String, bundle: String },
    #[error(
        "cds service {id:?}: bundle {bundle:?} is named twice in `bundles` (each bundle gives one card)"
    )]
    DuplicateBundle { id: String, bundle: String },
    #[error(
        "cds service {id:?}: prefetch template {key:?} uses a token other than {{{{context.NAME}}}}"
    )]
    Prefetch { id: String, key: String },
}

/// A validated service.
#[derive(Clone, Debug)]
pub struct Service {
    config: ServiceConfig,
    prefetch: BTreeMap<String, String>,
    news2: News2Settings,
}

/// The validated services, by id.
#[derive(Clone, Debug)]
pub struct Services {
    services: Vec<Service>,
}

fn valid_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > 64 {
        return Err("must be 1 to 64 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        || id.starts_with('.')
    {
        return Err("may hold only letters, digits, '-', '_' and '.' (and not start with '.')");
    }
    if id == "feedback" {
        return Err("is reserved");
    }
    Ok(())
}

/// Whether every `{{…}}` token of `template` is `{{context.NAME}}` or a user token
/// ([`crate::hooks::USER_TOKENS`]).
fn template_ok(template: &str) -> bool {
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return false;
        };
        let token = after[..end].trim();
        let user = crate::hooks::USER_TOKENS
            .iter()
            .any(|(name, _)| *name == token);
        match token.strip_prefix("context.") {
            Some(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric()) => {}
            _ if user => {}
            _ => return false,
        }
        rest = &after[end + 2..];
    }
    true
}

impl CdsSection {
    /// Checks every service and builds them.
    pub fn validate(self) -> Result<Services, ConfigError> {
        let mut seen = BTreeSet::new();
        let mut services = vec![];
        let mut imaging = false;
        for c in self.services {
            valid_id(&c.id).map_err(|reason| ConfigError::Id {
                id: c.id.clone(),
                reason,
            })?;
            // One imaging service: two answered every finding twice to an EHR calling
            // both (a re-attack's finding).
            if c.kind == ServiceKind::Imaging && std::mem::replace(&mut imaging, true) {
                return Err(ConfigError::Invalid {
                    id: c.id.clone(),
                    reason: "a second imaging service (one shows the imaging results)",
                });
            }
            if !seen.insert(c.id.clone()) {
                return Err(ConfigError::DuplicateId { id: c.id });
            }
            if c.hook.is_empty()
                || c.hook.len() > 64
                || !c
                    .hook
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(ConfigError::Hook {
                    id: c.id,
                    hook: c.hook,
                });
            }
            let invalid = |reason| ConfigError::Invalid {
                id: c.id.clone(),
                reason,
            };
            if c.description.trim().is_empty() {
                return Err(invalid("description is empty"));
            }
            match c.kind {
                ServiceKind::Risk if c.bundles.is_empty() => {
                    return Err(invalid("a risk service names no bundles"));
                }
                ServiceKind::News2 if !c.bundles.is_empty() || !c.thresholds.is_empty() => {
                    return Err(invalid("a NEWS2 service takes no bundles or thresholds"));
                }
                ServiceKind::Imaging if !c.bundles.is_empty() || !c.thresholds.is_empty() => {
                    return Err(invalid(
                        "an imaging service takes no bundles or thresholds (it shows every imaging bundle's results)",
                    ));
                }
                ServiceKind::Imaging if c.hook != "patient-view" => {
                    return Err(invalid("an imaging service answers the patient-view hook"));
                }
                // Its Patient is read by id (a search's Bundle, or no prefetch, never
                // found the patient: a re-attack's finding).
                ServiceKind::Imaging
                    if c.prefetch.as_ref().is_some_and(|p| {
                        p.is_empty() || p.values().any(|t| t != "Patient/{{context.patientId}}")
                    }) =>
                {
                    return Err(invalid(
                        "an imaging service's prefetch must read the Patient, and only it: patient = \"Patient/{{context.patientId}}\"",
                    ));
                }
                _ => {}
            }
            // A bundle named twice would answer two identical cards.
            let mut bundles = BTreeSet::new();
            for b in &c.bundles {
                if !bundles.insert(b.as_str()) {
                    return Err(ConfigError::DuplicateBundle {
                        id: c.id.clone(),
                        bundle: b.clone(),
                    });
                }
            }
            for (bundle, t) in &c.thresholds {
                if !c.bundles.contains(bundle) {
                    return Err(invalid(
                        "a threshold names a bundle the service does not run",
                    ));
                }
                if !(*t > 0.0 && *t < 1.0) {
                    return Err(ConfigError::Threshold {
                        id: c.id.clone(),
                        bundle: bundle.clone(),
                    });
                }
            }
            let look_back = c.look_back_minutes.unwrap_or(720);
            if look_back == 0 || look_back > 7 * 24 * 60 {
                return Err(invalid("look_back_minutes must lie in 1..=10080 (a week)"));
            }
            if c.wording.source_label.trim().is_empty() {
                return Err(invalid("wording.source_label is empty"));
            }
            if !(c.wording.source_url.starts_with("https://")
                || c.wording.source_url.starts_with("http://"))
            {
                return Err(invalid("wording.source_url is not an http(s) URL"));
            }
            let prefetch = match (&c.prefetch, c.kind) {
                (Some(p), _) => p.clone(),
                (None, ServiceKind::News2) => news2_prefetch(),
                (None, ServiceKind::Risk) => BTreeMap::new(),
                (None, ServiceKind::Imaging) => imaging_prefetch(),
            };
            for (key, template) in &prefetch {
                if !template_ok(template) {
                    return Err(ConfigError::Prefetch {
                        id: c.id.clone(),
                        key: key.clone(),
                    });
                }
            }
            let news2 = News2Settings {
                vitals: VitalsOptions {
                    look_back: Duration::minutes(i64::from(look_back)),
                    ..VitalsOptions::default()
                },
                scale2_conditions: c.scale2_conditions.clone(),
                pregnancy_conditions: c
                    .pregnancy_conditions
                    .clone()
                    .unwrap_or_else(default_pregnancy_conditions),
                ..News2Settings::default()
            };
            services.push(Service {
                config: c,
                prefetch,
                news2,
            });
        }
        Ok(Services { services })
    }
}

impl Services {
    /// The built-in services ([`CdsSection::default`]).
    pub fn builtin() -> Services {
        CdsSection::default()
            .validate()
            .unwrap_or_else(|_| Services { services: vec![] })
    }

    /// The service with this id.
    pub fn get(&self, id: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.config.id == id)
    }

    /// Every service, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Service> {
        self.services.iter()
    }

    /// The bundles risk services name that `known` says are not in the model repository,
    /// as (service id, bundle). Such a service still starts (a bundle may be added to the
    /// repository later), and its card for that bundle says the model is not serving; the
    /// caller that builds the services with the repository at hand warns of these
    /// ([`Services::warn_unknown_bundles`]).
    pub fn unknown_bundles(&self, known: impl Fn(&str) -> bool) -> Vec<(&str, &str)> {
        self.services
            .iter()
            .filter(|s| s.config.kind == ServiceKind::Risk)
            .flat_map(|s| {
                s.config
                    .bundles
                    .iter()
                    .filter(|b| !known(b))
                    .map(move |b| (s.config.id.as_str(), b.as_str()))
            })
            .collect()
    }

    /// Logs a warning for each of [`Services::unknown_bundles`] (configuration names only, no
    /// patient data); returns how many there were.
    pub fn warn_unknown_bundles(&self, known: impl Fn(&str) -> bool) -> usize {
        let unknown = self.unknown_bundles(known);
        for (service, bundle) in &unknown {
            tracing::warn!(
                service = %service,
                bundle = %bundle,
                "a CDS risk service names a model bundle that is not in the repository: its \
                 cards will say the model is not serving until the bundle is loaded"
            );
        }
        unknown.len()
    }

    /// The discovery response (`GET /cds-services`).
    pub fn discovery(&self) -> crate::hooks::Discovery {
        crate::hooks::Discovery {
            services: self.services.iter().map(Service::descriptor).collect(),
        }
    }
}

/// What a NEWS2 service answered, with the assessment behind it (for audit and metrics).
#[derive(Clone, Debug)]
pub struct News2Outcome {
    pub response: CdsResponse,
    pub assessment: Assessment,
}

/// Why a service could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request itself is wrong (answer 400).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The service is not a NEWS2 service.
    #[error("service {id:?} is not a NEWS2 service")]
    NotNews2 { id: String },
}

impl Service {
    /// The configuration it was built from.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Its kind.
    pub fn kind(&self) -> ServiceKind {
        self.config.kind
    }

    /// Its prefetch templates.
    pub fn prefetch(&self) -> &BTreeMap<String, String> {
        &self.prefetch
    }

    /// Its NEWS2 settings (meaningful for NEWS2 services).
    pub fn news2_settings(&self) -> &News2Settings {
        &self.news2
    }

    /// Its entry in the discovery response.
    pub fn descriptor(&self) -> ServiceDescriptor {
        ServiceDescriptor {
            hook: self.config.hook.clone(),
            title: self.config.title.clone(),
            description: self.config.description.clone(),
            id: self.config.id.clone(),
            prefetch: self.prefetch.clone(),
            usage_requirements: self.config.usage_requirements.clone(),
        }
    }

    /// The prefetch keys the request left out (the client chose not to fetch them, or could
    /// not: CDS Hooks 2.0), each with its template rendered for this request (a FHIR query
    /// relative to `fhirServer`), for the caller to fetch. A key answered `null` is not
    /// missing: the client has no data for it. A template naming a context field the request
    /// does not have (an optional one, such as `encounterId`) cannot be fetched: its key is
    /// left out here and counted as not read ([`Service::collect`]); it failed the whole
    /// call with 400 (a review's finding).
    pub fn missing_prefetch(
        &self,
        request: &HookRequest,
    ) -> Result<Vec<(String, String)>, RequestError> {
        let mut out = vec![];
        for (key, template) in &self.prefetch {
            if request.answered(key) {
                continue;
            }
            match render_prefetch(template, request) {
                Ok(query) => out.push((key.clone(), query)),
                // The hook's own required field (patient-view's patientId) is the request's
                // error, not a key to leave unread.
                Err(RequestError::TemplateContext { field }) if field != "patientId" => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The request's prefetch (every entry under a key the service declares, a resource or
    /// a Bundle; `null` skipped, other keys not read) plus
    /// `fetched` (key, resource) as one set, and whether the patient's Conditions were read
    /// (a prefetch or fetch answered a key whose template searches `Condition` with a
    /// Bundle, and no Bundle of Conditions added is one page of a longer result: a `next`
    /// link, or a `total` above its matches — see [`crate::fhir::Bundle::is_complete`]).
    /// With only part of the Conditions, "absent" is not "no": a `condition` feature is then
    /// missing, never 0.
    pub fn collect(
        &self,
        request: &HookRequest,
        fetched: impl Into<Fetched>,
        limits: &Limits,
    ) -> Result<(Resources, bool), ServiceError> {
        let Fetched {
            resources: fetched,
            failed,
        } = fetched.into();
        let searches_conditions = |key: &str| {
            self.prefetch
                .get(key)
                .is_some_and(|t| t.starts_with("Condition?") || t.starts_with("Condition/"))
        };
        let mut resources = Resources::of_server(request.fhir_server.as_deref());
        let mut conditions_read = false;
        if let Some(prefetch) = &request.prefetch {
            for (key, value) in prefetch {
                // Only the keys this service asks for (its discovery's `prefetch`): what the
                // EHR sends under another key is not what the service's templates select
                // (another patient's search, any number of keys of 10,000 resources each:
                // a red-team finding), and is left unread.
                if !self.prefetch.contains_key(key) {
                    continue;
                }
                if value.is_null() {
                    // No data (CDS Hooks 2.0): a search that found nothing. It was read as
                    // "not fetched", and a patient with no Conditions never got a risk score
                    // from a conformant EHR (a review's finding). A read's `null` adds nothing.
                    if self.prefetch[key].contains('?') {
                        let no_matches = serde_json::json!({
                            "resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []
                        });
                        let none = Resource::from_value(&no_matches, limits).map_err(|source| {
                            RequestError::Prefetch {
                                key: key.chars().take(64).collect(),
                                source,
                            }
                        })?;
                        conditions_read |= searches_conditions(key);
                        self.add_answer(&mut resources, key, none);
                    }
                    continue;
                }
                let r = Resource::from_value(value, limits).map_err(|source| {
                    RequestError::Prefetch {
                        key: key.chars().take(64).collect(),
                        source,
                    }
                })?;
                conditions_read |= searches_conditions(key) && self.answers(key, &r);
                self.add_answer(&mut resources, key, r);
            }
        }
        let fetched_keys: Vec<String> = fetched.iter().map(|(k, _)| k.clone()).collect();
        for (key, r) in fetched {
            conditions_read |= searches_conditions(&key) && self.answers(&key, &r);
            self.add_answer(&mut resources, &key, r);
        }
        // A search whose fetch failed is not read: what it would have held is unknown, never
        // "nothing recorded". So is an Observation search of any code (the vitals) that the
        // client left out and that was not fetched (no FHIR server that may be asked, a
        // template this request cannot fill): a NEWS2 card said "no value recorded" of every
        // parameter when nothing was read (a review's finding). A search by code left out
        // (consciousness, pregnancy: searches beside the vitals) does not hold the others'
        // values in doubt, as before; the Conditions are marked below. A risk service's every
        // search is its features' only source: one left out and not fetched leaves the
        // features it would have found not known (an Observation search by code read "no
        // recent result", an Encounter search "no current encounter": a review's finding).
        let risk = self.config.kind == ServiceKind::Risk;
        for (key, template) in &self.prefetch {
            let failed_key = failed.contains(key);
            if !failed_key && (request.answered(key) || fetched_keys.iter().any(|k| k == key)) {
                continue;
            }
            let search = unread_search(template);
            if failed_key
                || search.resource_type == "Observation" && search.codes.is_none()
                || risk && template.contains('?')
            {
                resources.add_unread_search(search);
            }
        }
        if !conditions_read {
            resources.mark_unread("Condition");
        }
        let conditions_read = conditions_read && resources.is_complete("Condition");
        Ok((resources, conditions_read))
    }

    /// Adds what answered the prefetch `key`: a search's Bundle with the codes it searched
    /// for; in a search's place anything else (an OperationOutcome, which CDS Hooks 2.0
    /// says a client SHOULD send when its prefetch failed, or a lone resource) is a search
    /// not read, never "nothing recorded" (an OperationOutcome for the consciousness key let
    /// an older "Alert" be scored NEWS2 0: a red-team finding).
    fn add_answer(&self, resources: &mut Resources, key: &str, r: Resource) {
        let Some(template) = self.prefetch.get(key) else {
            return resources.add(r);
        };
        // Only a searchset without a failed entry, whose matches are of the searched type,
        // answers a search (a batch-response whose search failed, or a searchset with an
        // error outcome, was read as empty too).
        if template.contains('?') && !self.answers(key, &r) {
            resources.add_unread_search(unread_search(template));
            return;
        }
        let path = template
            .split_once('?')
            .map_or(template.as_str(), |(p, _)| p);
        resources.add_search_answer(r, path, search_codes(template).as_deref());
    }

    /// Whether `r` answers the search of the prefetch `key`: a searchset without a failed
    /// entry ([`crate::fhir::Bundle::is_search_answer`]) whose matches are all of the type the
    /// template searches ([`crate::fhir::Bundle::matches_only`]). A searchset of Observations
    /// under the Condition key read as "every Condition read, none found" (a red-team
    /// finding): an answer of another type is a broken answer, as an OperationOutcome in its
    /// place is.
    fn answers(&self, key: &str, r: &Resource) -> bool {
        let Some(template) = self.prefetch.get(key) else {
            return false;
        };
        matches!(r, Resource::Bundle(b) if b.is_search_answer()
            && searched_type(template).is_none_or(|t| b.matches_only(t)))
    }

    /// How far back Observations are read.
    pub fn look_back(&self) -> Duration {
        self.news2.vitals.look_back
    }

    /// Answers a NEWS2 hook request as of `now`: the request's prefetch (every entry under a
    /// key the service declares, a resource or a Bundle; `null` skipped) plus `fetched` (what the caller fetched for
    /// [`Service::missing_prefetch`]) are assessed for `context.patientId`, and the
    /// response holds one card (the score, what is missing, or why NEWS2 does not apply).
    pub fn evaluate_news2(
        &self,
        request: &HookRequest,
        fetched: impl Into<Fetched>,
        now: DateTime<Utc>,
        limits: &Limits,
    ) -> Result<News2Outcome, ServiceError> {
        if self.config.kind != ServiceKind::News2 {
            return Err(ServiceError::NotNews2 {
                id: self.config.id.clone(),
            });
        }
        request.validate(&self.config.hook)?;
        let patient_id = request
            .patient_id()
            .ok_or(RequestError::Context { field: "patientId" })?;
        // The Conditions not read (no Bundle answered a Condition search) are marked so:
        // a pregnancy or a scale 2 prescription may be among them.
        let (resources, _) = self.collect(request, fetched, limits)?;
        let assessment = assess(&resources, now, Some(patient_id), &self.news2);
        let card = news2_card(&assessment, &self.config.wording);
        // No patient data: the service, the invocation and the kind of outcome.
        tracing::debug!(
            service = %self.config.id,
            hook_instance = %request.hook_instance,
            outcome = match &assessment {
                Assessment::Scored(s) => s.score.risk.name(),
                Assessment::Incomplete(_) => "incomplete",
                Assessment::NotApplicable(_) => "not applicable",
            },
            card = %card.uuid,
            "NEWS2 evaluated"
        );
        Ok(News2Outcome {
            response: CdsResponse {
                cards: vec![card],
                system_actions: vec![],
            },
            assessment,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support;

    #[derive(Deserialize)]
    struct Doc {
        cds: CdsSection,
    }

    fn parse(text: &str) -> Result<Services, ConfigError> {
        toml::from_str::<Doc>(text).unwrap().cds.validate()
    }

    /// A Condition searchset of `n` matches (none of them an infection), with `total` and a
    /// `next` link when asked.
    fn conditions(n: usize, total: Option<u64>, next: bool) -> serde_json::Value {
        let entry: Vec<_> = (0..n)
            .map(|i| {
                serde_json::json!({"search": {"mode": "match"}, "resource": {
                    "resourceType": "Condition", "id": format!("c{i}"),
                    "subject": {"reference": "Patient/p1"},
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}}})
            })
            .collect();
        let mut b =
            serde_json::json!({"resourceType": "Bundle", "type": "searchset", "entry": entry});
        if let Some(t) = total {
            b["total"] = t.into();
        }
        if next {
            b["link"] = serde_json::json!([{"relation": "next",
                "url": "https://ehr.example/fhir/Condition?patient=p1&_page=2"}]);
        }
        b
    }

    #[test]
    fn one_page_of_a_longer_condition_search_is_not_the_patients_conditions() {
        let services = parse(&test_support::icu_risk_service(
            r#"prefetch = { conditions = "Condition?patient={{context.patientId}}&clinical-status=active" }"#,
        ))
        .unwrap();
        let service = services.get("icu").unwrap();
        let request = |prefetch: serde_json::Value| -> HookRequest {
            test_support::hook_request("p1", serde_json::json!({"conditions": prefetch}))
        };
        let read = |prefetch: serde_json::Value, fetched: Vec<(String, Resource)>| {
            service
                .collect(&request(prefetch), fetched, &Limits::default())
                .unwrap()
        };
        // 20 entries of 25, a next page: the other 5 (an infection among them, perhaps) are
        // unseen, so "no infection" cannot be said.
        let (r, conditions_read) = read(conditions(20, Some(25), true), vec![]);
        assert_eq!(r.conditions.len(), 20);
        assert!(!conditions_read);
        // Each sign alone.
        assert!(!read(conditions(20, Some(25), false), vec![]).1);
        assert!(!read(conditions(20, None, true), vec![]).1);
        // The whole result: read.
        assert!(read(conditions(20, Some(20), false), vec![]).1);
        assert!(read(conditions(0, Some(0), false), vec![]).1);
        // The same for what was fetched, and one partial page spoils a whole one.
        let page = |v| Resource::from_value(&v, &Limits::default()).unwrap();
        let fetched = vec![(
            "conditions".to_owned(),
            page(conditions(20, Some(25), true)),
        )];
        assert!(!read(serde_json::Value::Null, fetched).1);
        let fetched = vec![(
            "conditions".to_owned(),
            page(conditions(20, Some(20), false)),
        )];
        assert!(read(serde_json::Value::Null, fetched).1);
        let fetched = vec![("other".to_owned(), page(conditions(20, Some(25), true)))];
        assert!(!read(conditions(3, Some(3), false), fetched).1);
    }

    #[test]
    fn builtin_news2_service() {
        let s = Services::builtin();
        let d = s.discovery();
        assert_eq!(d.services.len(), 1);
        let news2 = &d.services[0];
        assert!(news2.id.contains("news2"));
        assert_eq!(news2.hook, "patient-view");
        assert_eq!(news2.prefetch["patient"], "Patient/{{context.patientId}}");
        assert_eq!(
            news2.prefetch["vitals"],
            "Observation?patient={{context.patientId}}&category=vital-signs&_sort=-date&_count=100"
        );
        assert_eq!(
            news2.prefetch["conditions"],
            "Condition?patient={{context.patientId}}"
        );
        // An empty [cds] table keeps the defaults.
        let s = parse("[cds]\n").unwrap();
        assert!(s.get(DEFAULT_NEWS2_ID).is_some());
    }

    #[test]
    fn configured_services() {
        let s = parse(
            r#"
            [[cds.services]]
            id = "ward-news2"
            hook = "patient-view"
            description = "NEWS2"
            kind = "news2"
            look_back_minutes = 240
            scale2_conditions = ["http://example.org/codes|target-88-92"]
            [cds.services.wording]
            footer = "Call the outreach team on 1234."

            [[cds.services]]
            id = "icu-mortality"
            hook = "order-select"
            description = "ICU mortality risk"
            kind = "risk"
            bundles = ["icu-mortality"]
            thresholds = { icu-mortality = 0.3 }
            "#,
        )
        .unwrap();
        let w = s.get("ward-news2").unwrap();
        assert_eq!(w.news2_settings().vitals.look_back, Duration::hours(4));
        assert_eq!(w.news2_settings().scale2_conditions.len(), 1);
        assert_eq!(
            w.config().wording.source_label,
            Wording::default().source_label
        );
        assert_eq!(s.get("icu-mortality").unwrap().kind(), ServiceKind::Risk);
        assert!(s.get("icu-mortality").unwrap().prefetch().is_empty());
    }

    /// Review findings: a bundle named twice in one service gave two identical cards; a
    /// bundle not in the repository starts (it may be loaded later) and is reported.
    #[test]
    fn a_bundle_named_twice_is_refused_and_an_unknown_one_reported() {
        let risk = |bundles: &str| {
            format!(
                "[[cds.services]]\nid = \"icu\"\nhook = \"patient-view\"\ndescription = \"d\"\nkind = \"risk\"\nbundles = {bundles}\n"
            )
        };
        let e = parse(&risk(r#"["icu-mortality", "icu-mortality"]"#)).unwrap_err();
        assert!(
            matches!(&e, ConfigError::DuplicateBundle { id, bundle } if id == "icu" && bundle == "icu-mortality"),
            "{e:?}"
        );
        assert!(e.to_string().contains("named twice"), "{e}");
        let s = parse(&risk(r#"["icu-mortality", "no-such-bundle"]"#)).unwrap();
        let known = |b: &str| b == "icu-mortality";
        assert_eq!(s.unknown_bundles(known), vec![("icu", "no-such-bundle")]);
        assert_eq!(s.warn_unknown_bundles(known), 1);
        assert!(s.unknown_bundles(|_| true).is_empty());
        // NEWS2 services name no bundles.
        assert!(Services::builtin().unknown_bundles(|_| false).is_empty());
    }

    /// The imaging-results service: one, on patient-view, reading the Patient by id, with
    /// no bundles (two answered every finding twice; a search prefetch or none never found
    /// the patient: a re-attack's findings).
    #[test]
    fn an_imaging_service_is_one_reading_its_patient() {
        let imaging = |id: &str, extra: &str| {
            format!(
                "[[cds.services]]\nid = \"{id}\"\nhook = \"patient-view\"\ndescription = \"d\"\nkind = \"imaging\"\n{extra}"
            )
        };
        let s = parse(&imaging("img", "")).unwrap();
        let service = s.get("img").unwrap();
        assert_eq!(service.kind(), ServiceKind::Imaging);
        assert_eq!(service.prefetch(), &imaging_prefetch());
        for (text, says) in [
            (
                imaging("a", "") + &imaging("b", ""),
                "a second imaging service",
            ),
            (imaging("a", "bundles = [\"x\"]\n"), "takes no bundles"),
            (
                imaging("a", "").replace("patient-view", "order-select"),
                "patient-view hook",
            ),
            (
                imaging(
                    "a",
                    "[cds.services.prefetch]\npt = \"Patient?_id={{context.patientId}}\"\n",
                ),
                "must read the Patient",
            ),
            (
                imaging("a", "[cds.services.prefetch]\n"),
                "must read the Patient",
            ),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        assert_eq!(
            builtin_imaging_service().id,
            DEFAULT_IMAGING_ID,
            "the built-in one"
        );
    }

    /// Review finding: the built-in risk services' discovery said they read Patient,
    /// Observation, Condition and Encounter whatever their prefetch asked for (the Pima
    /// service asks for Patient and Observation only).
    #[test]
    fn usage_requirements_name_what_the_prefetch_reads() {
        let features = test_support::features;
        // Pima: Observations and the age.
        let pima = features(&["glucose", "age"]);
        let s = builtin_risk_service("pima-diabetes", "d", risk_prefetch(&pima));
        assert_eq!(
            s.usage_requirements.as_deref(),
            Some("Read access to the patient's Patient and Observation resources")
        );
        let icu = features(&["systolic_bp", "infection", "emergency", "female"]);
        let s = builtin_risk_service("icu-mortality", "d", risk_prefetch(&icu));
        assert_eq!(
            s.usage_requirements.as_deref(),
            Some(
                "Read access to the patient's Patient, Observation, Condition and Encounter resources"
            )
        );
        // Conditions alone; nothing at all.
        let s = builtin_risk_service("x", "d", risk_prefetch(&icu[1..2]));
        assert_eq!(
            s.usage_requirements.as_deref(),
            Some("Read access to the patient's Condition resources")
        );
        assert_eq!(usage_requirements(&BTreeMap::new()), None);
        // NEWS2 (vitals, consciousness and pregnancy are all Observations).
        let d = Services::builtin().discovery();
        assert_eq!(
            d.services[0].usage_requirements.as_deref(),
            Some("Read access to the patient's Patient, Observation and Condition resources")
        );
    }

    #[test]
    fn invalid_configurations() {
        let svc = |extra: &str| {
            format!(
                "[[cds.services]]\nid = \"a\"\nhook = \"patient-view\"\ndescription = \"d\"\nkind = \"news2\"\n{extra}"
            )
        };
        let bad_id = svc("").replace("id = \"a\"", "id = \"a/b\"");
        assert!(matches!(parse(&bad_id), Err(ConfigError::Id { .. })));
        let twice = format!("{}\n{}", svc(""), svc(""));
        assert!(matches!(
            parse(&twice),
            Err(ConfigError::DuplicateId { .. })
        ));
        let hook = svc("").replace("patient-view", "Patient View");
        assert!(matches!(parse(&hook), Err(ConfigError::Hook { .. })));
        assert!(matches!(
            parse(&svc("look_back_minutes = 0")),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse(&svc("bundles = [\"x\"]")),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse(&svc("prefetch = { p = \"Patient/{{userNobodyId}}\" }")),
            Err(ConfigError::Prefetch { .. })
        ));
        let risk = svc("bundles = [\"m\"]\nthresholds = { m = 1.5 }").replace("news2", "risk");
        assert!(matches!(parse(&risk), Err(ConfigError::Threshold { .. })));
        // Unknown keys are configuration errors.
        assert!(toml::from_str::<Doc>(&svc("colour = \"red\"")).is_err());
        assert!(toml::from_str::<Doc>(&svc("scale2_conditions = [\"77386006\"]")).is_err());
    }
}
