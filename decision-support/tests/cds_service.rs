//! The built-in NEWS2 service end to end: a CDS Hooks 2.0 patient-view request (the
//! specification's example envelope) with prefetched FHIR → one card.

use chrono::{DateTime, Utc};
use nightingale_decision_support::fhir::{Limits, Resource};
use nightingale_decision_support::hooks::{CdsResponse, HookRequest, Indicator};
use nightingale_decision_support::news2::Assessment;
use nightingale_decision_support::service::{DEFAULT_NEWS2_ID, ServiceError, Services};
use serde_json::{Value, json};

fn now() -> DateTime<Utc> {
    "2024-05-01T12:00:00Z".parse().unwrap()
}

/// RR 25 (3), SpO2 91 % (3), FiO2 28 % = oxygen (2), SBP 95 (2), pulse 115 (2), new
/// confusion (3), 101.3 °F = 38.5 °C (1): 16 by RCP NEWS2 Chart 1, high. The fixture is
/// valid FHIR (R4B models of `fhir.resources`: tests/validate_fixtures.py).
fn vitals_bundle() -> Value {
    serde_json::from_str(include_str!("fixtures/news2-vitals-bundle.json")).unwrap()
}

fn request(patient: Value, vitals: Value) -> HookRequest {
    serde_json::from_value(json!({
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "fhirServer": "http://hooks.smarthealthit.org:9080",
        "hook": "patient-view",
        "fhirAuthorization": {
            "access_token": "some-opaque-fhir-access-token",
            "token_type": "Bearer", "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read",
            "subject": "cds-service4"
        },
        "context": {"userId": "Practitioner/example", "patientId": "1288992", "encounterId": "89284"},
        "prefetch": {"patient": patient, "vitals": vitals, "conditions": null}
    }))
    .unwrap()
}

/// The Patient of the specification's patient-view example (fixtures/patient.json), born
/// on `birth`.
fn patient(birth: &str) -> Value {
    let mut p: Value = serde_json::from_str(include_str!("fixtures/patient.json")).unwrap();
    p["birthDate"] = json!(birth);
    p
}

fn card_json(response: &CdsResponse) -> Value {
    serde_json::to_value(response).unwrap()
}

#[test]
fn a_high_news2_is_a_critical_card_with_its_reasons() {
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let out = service
        .evaluate_news2(
            &request(patient("1925-12-23"), vitals_bundle()),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    let Assessment::Scored(s) = &out.assessment else {
        panic!("not scored: {:?}", out.assessment)
    };
    assert_eq!(s.score.total, 16);
    let v = card_json(&out.response);
    let card = &v["cards"][0];
    assert_eq!(card["summary"], "NEWS2 16 — high clinical risk");
    assert_eq!(card["indicator"], "critical");
    assert_eq!(
        card["source"]["label"],
        "Royal College of Physicians NEWS2 (2017)"
    );
    assert!(
        card["source"]["url"]
            .as_str()
            .unwrap()
            .starts_with("https://www.rcp.ac.uk/")
    );
    let detail = card["detail"].as_str().unwrap();
    assert!(
        detail.contains("| Respiration rate | 25 breaths/min | 2024-05-01 11:30 UTC | 3 |"),
        "{detail}"
    );
    assert!(
        detail.contains("| SpO2 (scale 1) | 91 % | 2024-05-01 11:30 UTC | 3 |"),
        "{detail}"
    );
    assert!(
        detail.contains("| Air or oxygen | Oxygen | 2024-05-01 11:30 UTC | 2 |"),
        "{detail}"
    );
    assert!(
        detail.contains("| Systolic blood pressure | 95 mmHg |"),
        "{detail}"
    );
    assert!(
        detail.contains("| Consciousness | New confusion |"),
        "{detail}"
    );
    assert!(
        detail.contains("| Temperature | 38.5 °C (converted from \\[degF\\]) |"),
        "{detail}"
    );
    assert!(detail.contains("| **Total** | | | **16** |"), "{detail}");
    assert!(
        detail.contains("Continuous monitoring of vital signs"),
        "{detail}"
    );
    assert!(uuid::Uuid::parse_str(card["uuid"].as_str().unwrap()).is_ok());
    assert_eq!(v["systemActions"], json!([]));
}

#[test]
fn missing_data_is_an_info_card_listing_it() {
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let mut vitals = vitals_bundle();
    vitals["entry"].as_array_mut().unwrap().remove(6); // temperature
    let out = service
        .evaluate_news2(
            &request(patient("1925-12-23"), vitals),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    let card = &out.response.cards[0];
    assert_eq!(card.indicator, Indicator::Info);
    assert_eq!(card.summary, "NEWS2 not calculated: missing Temperature");
    assert!(card.detail.as_deref().unwrap().contains("no partial score"));
}

#[test]
fn the_caller_can_fetch_what_was_not_prefetched() {
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let req = request(patient("1925-12-23"), Value::Null);
    let missing = service.missing_prefetch(&req).unwrap();
    assert_eq!(
        missing,
        vec![
            (
                "conditions".to_owned(),
                "Condition?patient=1288992".to_owned()
            ),
            (
                "vitals".to_owned(),
                "Observation?patient=1288992&category=vital-signs&_sort=-date&_count=100"
                    .to_owned()
            ),
        ]
    );
    // Without the vitals: every parameter missing.
    let out = service
        .evaluate_news2(&req, vec![], now(), &Limits::default())
        .unwrap();
    assert!(matches!(out.assessment, Assessment::Incomplete(ref i) if i.missing.len() == 7));
    // With what the caller fetched: scored.
    let fetched = Resource::from_value(&vitals_bundle(), &Limits::default()).unwrap();
    let out = service
        .evaluate_news2(&req, vec![fetched], now(), &Limits::default())
        .unwrap();
    assert_eq!(out.response.cards[0].indicator, Indicator::Critical);
}

#[test]
fn children_get_a_not_applicable_card() {
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let out = service
        .evaluate_news2(
            &request(patient("2012-02-29"), vitals_bundle()),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    let card = &out.response.cards[0];
    assert_eq!(card.indicator, Indicator::Info);
    assert_eq!(card.summary, "NEWS2 not applicable: patient under 16");
}

#[test]
fn bad_requests_are_errors_not_cards() {
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let mut req = request(patient("1925-12-23"), vitals_bundle());
    req.hook = "order-select".into();
    assert!(matches!(
        service.evaluate_news2(&req, vec![], now(), &Limits::default()),
        Err(ServiceError::Request(_))
    ));
    let mut req = request(patient("1925-12-23"), vitals_bundle());
    req.context.remove("patientId");
    assert!(
        service
            .evaluate_news2(&req, vec![], now(), &Limits::default())
            .is_err()
    );
    let req = request(
        patient("1925-12-23"),
        json!({"resourceType": "Observation", "status": "final", "code": "not an object"}),
    );
    let e = service
        .evaluate_news2(&req, vec![], now(), &Limits::default())
        .unwrap_err();
    assert!(e.to_string().contains("prefetch \"vitals\""), "{e}");
}
