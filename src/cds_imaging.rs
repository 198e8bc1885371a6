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

/// The values of the patient's identifiers of `system` in use now (not `use: old`, no
/// period ended), from `resources` (the service's declared prefetch and what was fetched
/// from the FHIR server): the Patient whose id is `patient_id` (or the only one, if it has no
/// id), as NEWS2 and the risk cards find it. A Patient with another id is never used: its
/// studies are someone else's. A value with a control character is no Patient ID (FHIR
/// strings have none; a NUL in it could name another issuer's key: a red-team finding).
pub fn patient_identifiers(
    resources: &Resources,
    patient_id: Option<&str>,
    system: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<String> {
    // The patient in context by id: a Patient without one (an EHR's, or a FHIR server's
    // answer to a read) cannot be told to be this patient (a re-attack's finding).
    let Some(patient_id) = patient_id else {
        return Vec::new();
    };
    let Some(patient) =
        find_patient(resources, Some(patient_id)).filter(|p| p.id.as_deref() == Some(patient_id))
    else {
        return Vec::new();
    };
    let mut values: Vec<String> = patient
        .current_identifier_values(system, now)
        .into_iter()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty() && !v.chars().any(char::is_control))
        .collect();
    values.sort();
    values.dedup();
    values
}

/// The Patient resources of a request's prefetch under `keys` (the service's declared
/// ones: others are not read), as [`patient_identifiers`] takes them.
pub fn prefetched_patients(
    request: &HookRequest,
    keys: impl Fn(&str) -> bool,
    limits: &Limits,
) -> Vec<Resource> {
    let Some(prefetch) = request.prefetch.as_ref() else {
        return Vec::new();
    };
    prefetch
        .iter()
        .filter(|(k, v)| {
            keys(k) && v.get("resourceType").and_then(|t| t.as_str()) == Some("Patient")
        })
        .filter_map(|(_, v)| Resource::from_value(v, limits).ok())
        .collect()
}

/// Where a job's result objects are, for its card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// One destination took every kind (SR, SC).
    InPacs,
    /// Every kind was taken, but by different destinations: none holds them all.
    Split,
    /// Some kinds were, not these: still being tried (`pending`) or given up.
    Partly { missing: Vec<String>, pending: bool },
    /// Not yet: being sent, or tried again.
    Pending,
    /// Given up for every destination (the dead-letter folder).
    NotDelivered,
    /// No destination was configured: kept by Nightingale only.
    Local,
}

impl Delivery {
    /// From a job's objects: (kind, delivery state: `sent`, `pending`, `dead`, `local`). The
    /// result is in PACS where each kind was sent to a destination (a card said "the full
    /// result was sent" where the SC had been given up: a re-attack's finding).
    pub fn of<'a>(objects: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> Delivery {
        let objects: Vec<(&str, &str, &str)> = objects.into_iter().collect();
        let mut kinds: Vec<&str> = objects.iter().map(|(k, _, _)| *k).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let sent = |kind: &str| objects.iter().any(|(k, _, s)| *k == kind && *s == "sent");
        // A destination that took every kind (the SR at one PACS and the SC at another is
        // no full result anywhere: a re-attack's finding).
        let whole = objects.iter().any(|(_, d, _)| {
            kinds.iter().all(|k| {
                objects
                    .iter()
                    .any(|(k2, d2, s)| k2 == k && d2 == d && *s == "sent")
            })
        });
        let missing: Vec<String> = kinds
            .iter()
            .filter(|k| !sent(k))
            .map(|k| (*k).to_owned())
            .collect();
        let states: Vec<&str> = objects.iter().map(|(_, _, s)| *s).collect();
        if states.contains(&"sent") {
            if whole {
                Delivery::InPacs
            } else if missing.is_empty() {
                Delivery::Split
            } else {
                let pending = objects
                    .iter()
                    .any(|(k, _, s)| missing.iter().any(|m| m == k) && *s == "pending");
                Delivery::Partly { missing, pending }
            }
        } else if states.contains(&"pending") {
            Delivery::Pending
        } else if states.contains(&"dead") {
            Delivery::NotDelivered
        } else {
            Delivery::Local
        }
    }

    fn sentence(&self) -> String {
        let text = match self {
            Delivery::Partly { missing, pending } => {
                return format!(
                    "**Only part of the full result reached PACS**: its {} {}.",
                    missing
                        .iter()
                        .map(|k| match k.as_str() {
                            "SR" => "Structured Report",
                            "SC" => "Secondary Capture",
                            other => other,
                        })
                        .collect::<Vec<_>>()
                        .join(" and "),
                    if *pending {
                        "is not there yet (its delivery is still being tried)"
                    } else {
                        "did not arrive (its delivery was given up; an operator can send it again)"
                    }
                );
            }
            Delivery::InPacs => {
                "The full result (a DICOM Structured Report and a Secondary Capture) was sent to PACS, next to the images."
            }
            Delivery::Pending => {
                "The full result (a DICOM Structured Report and a Secondary Capture) is **not in PACS yet**: its delivery is still being tried."
            }
            Delivery::NotDelivered => {
                "The full result (a DICOM Structured Report and a Secondary Capture) **did not reach PACS**: its delivery was given up (an operator can send it again)."
            }
            Delivery::Local => {
                "The full result (a DICOM Structured Report and a Secondary Capture) is kept by Nightingale: no PACS destination is configured."
            }
            Delivery::Split => {
                "**The full result is split across PACS destinations**: its Structured Report and its Secondary Capture reached different ones, and none holds both."
            }
        };
        text.to_owned()
    }
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

/// The cards of a patient's finished jobs, newest first, each with its delivery and the
/// time it was made; `base` is the server's URL (`http(s)://host`), for the link to each
/// study's results; `more`: the patient has results beyond those shown (a last card says
/// so). Each card is paired with its (bundle, version) and its job's id.
pub fn cards(
    jobs: &[(Job, Delivery)],
    base: &str,
    more: bool,
) -> Vec<(Card, (String, String), Option<i64>)> {
    let mut out = Vec::new();
    let mut cut = more;
    'jobs: for (job, delivery) in jobs {
        let Some(findings) = job
            .findings
            .clone()
            .and_then(|f| serde_json::from_value::<Vec<Finding>>(f).ok())
        else {
            continue;
        };
        let made = chrono::DateTime::from_timestamp_millis(job.updated_ms)
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_else(|| "an unknown time".to_owned());
        for f in findings {
            if out.len() >= MAX_CARDS {
                cut = true;
                break 'jobs;
            }
            let verdict = if f.positive { "at or above" } else { "below" };
            let summary = format!(
                "AI imaging result ({} v{}): {} {:.2}, {verdict} threshold {:.2}",
                job.bundle, job.bundle_version, f.label, f.probability, f.threshold
            );
            let detail = format!(
                "The imaging model **{}** version **{}** read a series of this patient's study \
                 on {made} and gave **{}** ({}) a probability of **{:.3}**, {verdict} its \
                 operating threshold of {:.3}.\n\n\
                 **AI result – not for diagnosis without review.** {}",
                job.bundle,
                job.bundle_version,
                f.label,
                f.output,
                f.probability,
                f.threshold,
                delivery.sentence()
            );
            let card = Card::builder(
                &summary,
                if f.positive {
                    Indicator::Warning
                } else {
                    Indicator::Info
                },
                source(&format!(
                    "Nightingale imaging AI: {} {}",
                    job.bundle, job.bundle_version
                )),
            )
            .detail(detail)
            .link(Link {
                label: "Study results".into(),
                url: format!("{base}/results/studies/{}", job.study_uid),
                link_type: LinkType::Absolute,
                app_context: None,
            })
            .build();
            out.push((
                card,
                (job.bundle.clone(), job.bundle_version.clone()),
                Some(job.id),
            ));
        }
    }
    if cut {
        let card = Card::builder(
            &format!("More AI imaging results for this patient than the {MAX_CARDS} shown"),
            Indicator::Info,
            source("Nightingale imaging AI"),
        )
        .detail(format!(
            "Only the {MAX_CARDS} newest findings are shown here; the patient's other imaging AI \
             results are in PACS and in Nightingale's results."
        ))
        .build();
        out.push((card, (String::new(), String::new()), None));
    }
    out
}

fn source(label: &str) -> Source {
    Source {
        label: label.to_owned(),
        url: None,
        icon: None,
        topic: None,
    }
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
        let cards = cards(&[(j, Delivery::InPacs)], "http://n.test:8000", false);
        assert_eq!(cards.len(), 1);
        let (card, model, job_id) = &cards[0];
        assert_eq!(*job_id, Some(1));
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
        assert!(
            card.detail
                .as_deref()
                .unwrap()
                .contains("1970-01-01 00:00 UTC")
        );
        assert!(card.detail.as_deref().unwrap().contains("was sent to PACS"));
        // A job without readable findings gives no card.
        assert!(
            super::cards(
                &[(job(serde_json::json!("?")), Delivery::InPacs)],
                "x",
                false
            )
            .is_empty()
        );
        // Where the result is not in PACS, the card says so; more results than shown: a
        // last card says so.
        let one = serde_json::json!([{"output": "p", "label": "l", "probability": 0.2,
            "threshold": 0.5, "positive": false}]);
        for (delivery, says) in [
            (Delivery::Pending, "not in PACS yet"),
            (Delivery::NotDelivered, "did not reach PACS"),
            (Delivery::Local, "no PACS destination"),
        ] {
            let c = super::cards(&[(job(one.clone()), delivery.clone())], "x", false);
            assert!(
                c[0].0.detail.as_deref().unwrap().contains(says),
                "{delivery:?}"
            );
        }
        let many: Vec<_> = (0..12)
            .map(|_| (job(one.clone()), Delivery::InPacs))
            .collect();
        let c = super::cards(&many, "x", false);
        assert_eq!(c.len(), MAX_CARDS + 1);
        assert!(
            c[MAX_CARDS]
                .0
                .summary
                .starts_with("More AI imaging results")
        );
        assert_eq!(c[MAX_CARDS].2, None);
        // Each kind sent to some destination: in PACS; one kind not: partly, saying which.
        assert_eq!(
            Delivery::of([
                ("SR", "A", "dead"),
                ("SR", "B", "sent"),
                ("SC", "B", "sent"),
                ("SC", "A", "dead")
            ]),
            Delivery::InPacs
        );
        // The SR at one destination and the SC at another: no full result anywhere.
        let split = Delivery::of([
            ("SR", "A", "sent"),
            ("SC", "A", "dead"),
            ("SR", "B", "dead"),
            ("SC", "B", "sent"),
        ]);
        assert_eq!(split, Delivery::Split);
        assert!(split.sentence().contains("none holds both"));
        let partly = Delivery::of([("SR", "A", "sent"), ("SC", "A", "dead")]);
        assert_eq!(
            partly,
            Delivery::Partly {
                missing: vec!["SC".into()],
                pending: false
            }
        );
        assert!(
            partly
                .sentence()
                .contains("Secondary Capture did not arrive")
        );
        assert!(
            Delivery::of([("SR", "A", "pending"), ("SC", "A", "sent")])
                .sentence()
                .contains("Structured Report is not there yet")
        );
        assert_eq!(
            Delivery::of([("SR", "A", "dead"), ("SC", "A", "pending")]),
            Delivery::Pending
        );
        assert_eq!(Delivery::of([("SR", "A", "dead")]), Delivery::NotDelivered);
        assert_eq!(Delivery::of([("SR", "", "local")]), Delivery::Local);
    }

    /// The identifier a request's prefetch (every key) gives, one at most.
    fn patient_identifier(request: &HookRequest, system: &str, limits: &Limits) -> Option<String> {
        let mut resources = Resources::new();
        for r in prefetched_patients(request, |_| true, limits) {
            resources.add(r);
        }
        let mut v =
            patient_identifiers(&resources, request.patient_id(), system, chrono::Utc::now());
        (v.len() <= 1).then(|| v.pop()).flatten()
    }

    /// Every identifier of the system in use is matched, not only the first; a retired
    /// one (`use: old`, a period that ended) is not; a Patient under a key the service does
    /// not declare is not read (a review's findings).
    #[test]
    fn identifiers_in_use_are_matched_and_retired_ones_not() {
        let request: HookRequest = serde_json::from_value(serde_json::json!({
            "hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"patientId": "p1"},
            "prefetch": {"patient": {"resourceType": "Patient", "id": "p1", "identifier": [
                {"system": "urn:nhs", "value": "A"},
                {"system": "urn:nhs", "value": "B"},
                {"system": "urn:nhs", "value": "OLD", "use": "old"},
                {"system": "urn:nhs", "value": "ENDED", "period": {"end": "2001-01-01"}},
                {"system": "urn:nhs", "value": "RUNS", "period": {"end": "2999-01-01T00:00:00Z"}},
                {"system": "urn:nhs", "value": "BAD-END", "period": {"end": "soon"}},
                {"system": "urn:nhs", "value": "LATER", "period": {"start": "2999-01-01"}},
                {"system": "urn:nhs", "value": "STARTED", "period": {"start": "2001-01-01"}}]}}
        }))
        .unwrap();
        let limits = Limits::default();
        let of = |keys: &dyn Fn(&str) -> bool| {
            let mut resources = Resources::new();
            for r in prefetched_patients(&request, keys, &limits) {
                resources.add(r);
            }
            patient_identifiers(
                &resources,
                request.patient_id(),
                "urn:nhs",
                chrono::Utc::now(),
            )
        };
        assert_eq!(of(&|k| k == "patient"), ["A", "B", "RUNS", "STARTED"]);
        assert!(of(&|k| k == "other").is_empty());
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
        // A record without an id cannot be told to be the patient in context (a FHIR server
        // answering a read without one: a re-attack's finding), nor any without a patient
        // in context.
        assert_eq!(call(a.clone(), vec![patient(None, "A")]), None);
        let none = serde_json::json!({"userId": "Practitioner/1"});
        assert_eq!(call(none, vec![patient(Some("pB"), "B")]), None);
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
