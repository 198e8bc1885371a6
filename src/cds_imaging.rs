//! Imaging results as CDS cards (issue 10, item 5): on `patient-view`, one card per finding
//! the DICOM pipeline made for this patient's series.
//!
//! The FHIR Patient is matched to the DICOM Patient ID through one configured identifier
//! system (`--cds-imaging-identifier-system`, e.g. the NHS number's
//! `https://fhir.nhs.uk/Id/nhs-number`): the identifier's value and the series' Patient ID
//! are compared by their SHA-256 (`nightingale_dicom::series::patient_id_sha256`), so the
//! results store keeps no identifier. A card names the bundle and version that made the
//! finding, says it is an unreviewed AI result, and links to the study's results.

use nightingale_decision_support::fhir::{Limits, Resource, Resources};
use nightingale_decision_support::hooks::{Card, HookRequest, Indicator, Link, LinkType, Source};
use nightingale_decision_support::news2::find_patient;

use crate::pipeline::store::Job;

/// At most this many imaging cards per call (the newest first).
pub const MAX_CARDS: usize = 10;

/// The value of the patient's identifier of `system`, from the request's prefetched
/// Patient: the one whose id is `context.patientId` (or the only one, if it has no id), as
/// NEWS2 and the risk cards find it. A Patient with another id is never used: its studies
/// are someone else's.
pub fn patient_identifier(request: &HookRequest, system: &str, limits: &Limits) -> Option<String> {
    let mut resources = Resources::new();
    for value in request.prefetch.as_ref()?.values() {
        if value.get("resourceType").and_then(|t| t.as_str()) == Some("Patient")
            && let Ok(r) = Resource::from_value(value, limits)
        {
            resources.add(r);
        }
    }
    // A value with a control character is no Patient ID (FHIR strings have none; a NUL in
    // it could name another issuer's key: a red-team finding).
    find_patient(&resources, request.patient_id())?
        .identifier_value(system)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty() && !v.chars().any(char::is_control))
}

/// One finding of a job, as the pipeline stored it.
#[derive(serde::Deserialize)]
struct Finding {
    output: String,
    label: String,
    probability: f64,
    threshold: f64,
    positive: bool,
}

/// The cards of a patient's finished jobs; `base` is the server's URL (`http(s)://host`),
/// for the link to each study's results. Each card is paired with its (bundle, version).
pub fn cards(jobs: &[Job], base: &str) -> Vec<(Card, (String, String))> {
    let mut out = Vec::new();
    for job in jobs {
        let Some(findings) = job
            .findings
            .clone()
            .and_then(|f| serde_json::from_value::<Vec<Finding>>(f).ok())
        else {
            continue;
        };
        for f in findings {
            if out.len() >= MAX_CARDS {
                return out;
            }
            let verdict = if f.positive { "at or above" } else { "below" };
            let summary = format!(
                "AI imaging result ({} v{}): {} {:.2}, {verdict} threshold {:.2}",
                job.bundle, job.bundle_version, f.label, f.probability, f.threshold
            );
            let detail = format!(
                "The imaging model **{}** version **{}** read a series of this patient's study \
                 and gave **{}** ({}) a probability of **{:.3}**, {verdict} its operating \
                 threshold of {:.3}.\n\n\
                 **AI result – not for diagnosis without review.** The full result (a DICOM \
                 Structured Report and a Secondary Capture) is in PACS next to the images.",
                job.bundle, job.bundle_version, f.label, f.output, f.probability, f.threshold
            );
            let card = Card::builder(
                &summary,
                if f.positive {
                    Indicator::Warning
                } else {
                    Indicator::Info
                },
                Source {
                    label: format!(
                        "Nightingale imaging AI: {} {}",
                        job.bundle, job.bundle_version
                    ),
                    url: None,
                    icon: None,
                    topic: None,
                },
            )
            .detail(detail)
            .link(Link {
                label: "Study results".into(),
                url: format!("{base}/results/studies/{}", job.study_uid),
                link_type: LinkType::Absolute,
                app_context: None,
            })
            .build();
            out.push((card, (job.bundle.clone(), job.bundle_version.clone())));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::store::JobState;

    fn job(findings: serde_json::Value) -> Job {
        Job {
            id: 1,
            study_uid: "1.2.3".into(),
            series_uid: "1.2.3.4".into(),
            route: "r".into(),
            bundle: "image-orientation".into(),
            bundle_version: "1".into(),
            state: JobState::Done,
            reason: None,
            instances: 1,
            created_ms: 0,
            updated_ms: 0,
            findings: Some(findings),
            destinations: String::new(),
        }
    }

    #[test]
    fn a_card_per_finding_with_its_model_and_a_link() {
        let j = job(serde_json::json!([
            {"output": "probabilities", "label": "misoriented", "probability": 0.83,
             "threshold": 0.63, "positive": true, "instance_index": 0, "frame": 0}
        ]));
        let cards = cards(&[j], "http://n.test:8000");
        assert_eq!(cards.len(), 1);
        let (card, model) = &cards[0];
        assert_eq!(model, &("image-orientation".to_owned(), "1".to_owned()));
        assert_eq!(card.indicator, Indicator::Warning);
        assert!(
            card.summary
                .contains("misoriented 0.83, at or above threshold 0.63")
        );
        assert!(card.summary.chars().count() < 140);
        assert_eq!(
            card.links[0].url,
            "http://n.test:8000/results/studies/1.2.3"
        );
        assert!(
            card.detail
                .as_deref()
                .unwrap()
                .contains("not for diagnosis")
        );
        // A job without readable findings gives no card.
        assert!(super::cards(&[job(serde_json::json!("?"))], "x").is_empty());
    }

    #[test]
    fn the_identifier_of_the_configured_system_is_read_from_the_prefetched_patient() {
        let request: HookRequest = serde_json::from_value(serde_json::json!({
            "hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"patientId": "p1"},
            "prefetch": {"patient": {"resourceType": "Patient", "id": "p1", "identifier": [
                {"system": "https://example.org/mrn", "value": "M1"},
                {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": " 9434765919 "}]}}
        }))
        .unwrap();
        let limits = Limits::default();
        assert_eq!(
            patient_identifier(&request, "https://fhir.nhs.uk/Id/nhs-number", &limits).as_deref(),
            Some("9434765919")
        );
        assert_eq!(patient_identifier(&request, "https://other", &limits), None);
    }

    /// A prefetched Patient whose id is not `context.patientId` is someone else: their
    /// identifier (and so their studies' cards) is never used, even when it is the only one.
    #[test]
    fn another_patients_record_gives_no_identifier() {
        let call = |context: serde_json::Value, patients: Vec<serde_json::Value>| {
            let prefetch: serde_json::Map<String, serde_json::Value> = patients
                .into_iter()
                .enumerate()
                .map(|(i, p)| (format!("p{i}"), p))
                .collect();
            let request: HookRequest = serde_json::from_value(serde_json::json!({
                "hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                "context": context, "prefetch": prefetch,
            }))
            .unwrap();
            patient_identifier(&request, "urn:nhs", &Limits::default())
        };
        let patient = |id: Option<&str>, nhs: &str| {
            let mut p = serde_json::json!({"resourceType": "Patient",
                "identifier": [{"system": "urn:nhs", "value": nhs}]});
            if let Some(id) = id {
                p["id"] = id.into();
            }
            p
        };
        let a = serde_json::json!({"patientId": "pA"});
        assert_eq!(call(a.clone(), vec![patient(Some("pB"), "B")]), None);
        assert_eq!(
            call(
                a.clone(),
                vec![patient(Some("pB"), "B"), patient(Some("pA"), "A")]
            )
            .as_deref(),
            Some("A")
        );
        assert_eq!(
            call(a.clone(), vec![patient(None, "A")]).as_deref(),
            Some("A")
        );
        // No patient named: only an unambiguous single record.
        let none = serde_json::json!({"userId": "Practitioner/1"});
        assert_eq!(
            call(none.clone(), vec![patient(Some("pB"), "B")]).as_deref(),
            Some("B")
        );
        assert_eq!(
            call(
                none,
                vec![patient(Some("pB"), "B"), patient(Some("pC"), "C")]
            ),
            None
        );
    }

    /// Red-team finding: an identifier value with a NUL could name another issuer's key.
    #[test]
    fn an_identifier_with_a_control_character_is_no_patient_id() {
        let request = |value: &str| -> HookRequest {
            serde_json::from_value(serde_json::json!({
                "hook": "patient-view",
                "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                "context": {"userId": "Practitioner/1", "patientId": "p-1"},
                "prefetch": {"patient": {"resourceType": "Patient", "id": "p-1",
                    "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": value}]}}
            }))
            .unwrap()
        };
        let system = "https://fhir.nhs.uk/Id/nhs-number";
        let limits = Limits::default();
        assert_eq!(
            patient_identifier(&request(" 9434765919 "), system, &limits).as_deref(),
            Some("9434765919")
        );
        assert_eq!(
            patient_identifier(&request("HOSP_B\u{0}1000000004"), system, &limits),
            None
        );
    }
}
