//! nightingale-decision-support: clinical decision support for Nightingale — CDS Hooks 2.0
//! services, a FHIR R4 subset, NEWS2 and its cards. No HTTP here: the root package serves
//! the routes and calls this crate.
//!
//! # A tour
//!
//! An EHR opens a patient's record and calls `POST /cds-services/nightingale-news2` with a
//! CDS Hooks request whose prefetch holds the patient and their vital signs. The HTTP layer
//! first checks the JWT of the call ([`jwt::Verifier`]), then hands the parsed request to the
//! service:
//!
//! ```
//! use nightingale_decision_support::fhir::Limits;
//! use nightingale_decision_support::hooks::{HookRequest, Indicator};
//! use nightingale_decision_support::service::Services;
//!
//! // The built-in services (what `[[cds.services]]` gives when it is absent):
//! // NEWS2 on patient-view.
//! let services = Services::builtin();
//! let discovery = services.discovery(); // the body of GET /cds-services
//! assert_eq!(discovery.services[0].id, "nightingale-news2");
//!
//! // A patient-view request, prefetch included (a Bundle of Observations).
//! let loinc = |code: &str, value: f64, unit: &str| serde_json::json!({"resource": {
//!     "resourceType": "Observation", "status": "final",
//!     "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
//!     "subject": {"reference": "Patient/1288992"}, "effectiveDateTime": "2024-05-01T11:30:00Z",
//!     "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": unit}}});
//! let request: HookRequest = serde_json::from_value(serde_json::json!({
//!     "hook": "patient-view",
//!     "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
//!     "context": {"userId": "Practitioner/example", "patientId": "1288992"},
//!     "prefetch": {
//!         "patient": {"resourceType": "Patient", "id": "1288992", "birthDate": "1925-12-23"},
//!         "vitals": {"resourceType": "Bundle", "type": "searchset", "entry": [
//!             loinc("9279-1", 22.0, "/min"),         // respiration rate: 2
//!             loinc("59408-5", 95.0, "%"),           // SpO2 (scale 1): 1
//!             loinc("3151-8", 0.0, "L/min"),         // no oxygen flow: air, 0
//!             loinc("8480-6", 105.0, "mm[Hg]"),      // systolic: 1
//!             loinc("8867-4", 95.0, "/min"),         // pulse: 1
//!             {"resource": {"resourceType": "Observation", "status": "final",
//!                 "code": {"coding": [{"system": "http://loinc.org", "code": "67775-7"}]},
//!                 "subject": {"reference": "Patient/1288992"},
//!                 "effectiveDateTime": "2024-05-01T11:30:00Z",
//!                 "valueCodeableConcept": {"coding": [
//!                     {"system": "http://snomed.info/sct", "code": "248234008"}]}}}, // alert: 0
//!             loinc("8310-5", 101.3, "[degF]"),      // 38.5 °C: 1
//!         ]},
//!         "consciousness": {"resourceType": "Bundle", "type": "searchset", "entry": []},
//!         "pregnancy": {"resourceType": "Bundle", "type": "searchset", "entry": []}
//!     }
//! }))?;
//!
//! let service = services.get("nightingale-news2").expect("built in");
//! // What the EHR left out (`null` would say it has none), as FHIR queries for the caller
//! // to fetch:
//! assert_eq!(service.missing_prefetch(&request)?,
//!            vec![("conditions".to_owned(), "Condition?patient=1288992".to_owned())]);
//! let now = "2024-05-01T12:00:00Z".parse()?;
//! let outcome = service.evaluate_news2(&request, vec![], now, &Limits::default())?;
//! let card = &outcome.response.cards[0];
//! assert_eq!(card.summary, "NEWS2 6 — medium clinical risk");
//! assert_eq!(card.indicator, Indicator::Warning);
//! // `outcome.response` serialises to the CDS Hooks response body.
//! let body = serde_json::to_string(&outcome.response)?;
//! assert!(body.contains("\"systemActions\":[]"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Had a parameter been missing, the card would say which ("NEWS2 not calculated: missing
//! Temperature", indicator info); for a patient under 16 or pregnant, that NEWS2 does not
//! apply. A score is never given from part of the data.
//!
//! # The pieces
//! - [`fhir`]: the FHIR R4 subset (Patient, Observation, Condition, Bundle), bounded input,
//!   errors without patient data.
//! - [`vitals`]: the latest usable value of each NEWS2 parameter (LOINC/SNOMED codes, UCUM
//!   conversion, look-back window).
//! - [`news2`]: the RCP NEWS2 (2017) chart, and [`news2::assess`] for a patient.
//! - [`hooks`]: CDS Hooks 2.0 types: discovery, request, cards (a checked builder),
//!   feedback.
//! - [`cards`]: the NEWS2 cards.
//! - [`service`]: services from `[[cds.services]]`, validated; the NEWS2 service.
//! - [`feedback`]: feedback joined to the card (service, model version) it is about, and
//!   override rates.
//! - [`jwt`]: verification of the EHR's JWT (asymmetric algorithms, trusted issuers' JWKS,
//!   audience, times, `jti` replay).
//!
//! # Checking the caller
//!
//! ```no_run
//! use nightingale_decision_support::jwt::{JwtOptions, Verifier};
//!
//! let mut verifier = Verifier::new(JwtOptions::default());
//! // `--cds-trust ISSUER=JWKS_FILE`, once per EHR.
//! verifier.trust_file("https://ehr.example.org", "ehr-jwks.json".as_ref())?;
//! let now = std::time::SystemTime::now()
//!     .duration_since(std::time::UNIX_EPOCH)?
//!     .as_secs();
//! // The audience is this service's URL as called.
//! let caller = verifier.verify_header(
//!     Some("Bearer eyJ..."),
//!     "http://127.0.0.1:8080/cds-services/nightingale-news2",
//!     now,
//! )?;
//! println!("call from {}", caller.issuer);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A verifier with no trusted issuer refuses every token: with none configured, every
//! service call is unauthorised.

pub mod cards;
pub mod feedback;
pub mod fhir;
pub mod hooks;
pub mod json;
pub mod jwt;
pub mod news2;
pub mod risk;
pub mod service;
pub mod vitals;

// The crate by its name in its unit tests too, as the shared test setup names it.
#[cfg(test)]
extern crate self as nightingale_decision_support;

/// Test setup shared with the integration tests (tests/support/mod.rs).
#[cfg(test)]
#[path = "../tests/support/mod.rs"]
mod test_support;
