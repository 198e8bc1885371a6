//! Test setup shared by the crate's unit tests (src/lib.rs includes this file as
//! `test_support`) and its integration tests (`mod support;`). It names the crate's items by
//! the crate's name, which src/lib.rs gives the crate itself in its unit tests.

// Each test target uses only some of what is here.
#![allow(dead_code)]

use chrono::{DateTime, Duration, Utc};
use nightingale_decision_support::risk::MappingContext;
use nightingale_models::manifest::FeatureSpec;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub const LOINC: &str = "http://loinc.org";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const UCUM: &str = "http://unitsofmeasure.org";

/// The tests' "now": 2024-05-01 12:00 UTC.
pub fn now() -> DateTime<Utc> {
    "2024-05-01T12:00:00Z".parse().unwrap()
}

/// The model features the tests use, one a line, as a bundle's manifest declares them.
const FEATURES: &str = r#"f = [
    { name = "age", unit = "a", fhir = "patient-age" },
    { name = "systolic_bp", unit = "mm[Hg]", code = "http://loinc.org|8480-6" },
    { name = "glucose", unit = "mg/dL", code = "http://loinc.org|1518-0" },
    { name = "female", unit = "1", fhir = "patient-female" },
    { name = "infection", unit = "1", fhir = "condition", conditions = ["http://snomed.info/sct|91302008"] },
    { name = "emergency", unit = "1", fhir = "encounter-class", encounter_class = ["EMER"] },
    { name = "pedigree", unit = "1" },
]"#;

/// The features named, in the order named (each must be one of [`FEATURES`]).
pub fn features(names: &[&str]) -> Vec<FeatureSpec> {
    #[derive(serde::Deserialize)]
    struct Doc {
        f: Vec<FeatureSpec>,
    }
    let all = toml::from_str::<Doc>(FEATURES).unwrap().f;
    names
        .iter()
        .map(|name| {
            all.iter()
                .find(|f| f.name == *name)
                .unwrap_or_else(|| panic!("no test feature {name}"))
                .clone()
        })
        .collect()
}

/// The `[cds]` TOML of one risk service `icu` (patient-view, the `icu-mortality` bundle),
/// `prefetch` (TOML lines of the service's table) added.
pub fn icu_risk_service(prefetch: &str) -> String {
    format!(
        r#"
        [[cds.services]]
        id = "icu"
        hook = "patient-view"
        description = "ICU mortality risk"
        kind = "risk"
        bundles = ["icu-mortality"]
        {prefetch}
        "#
    )
}

/// A patient-view hook request for `patient_id` with `prefetch`.
pub fn hook_request<T: DeserializeOwned>(patient_id: &str, prefetch: Value) -> T {
    serde_json::from_value(json!({
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/example", "patientId": patient_id},
        "prefetch": prefetch
    }))
    .unwrap()
}

/// The mapping context of a call for p1 at [`now`], without an encounter: a 12-hour
/// look-back, 5 minutes of clock skew.
pub fn mapping_context(conditions_read: bool) -> MappingContext<'static> {
    MappingContext {
        patient_id: "p1",
        encounter_id: None,
        now: now(),
        look_back: Duration::hours(12),
        future_skew: Duration::minutes(5),
        conditions_read,
    }
}
