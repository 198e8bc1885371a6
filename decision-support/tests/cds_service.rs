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
        "prefetch": {"patient": patient, "vitals": vitals, "conditions": null,
                     "consciousness": null, "pregnancy": null}
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
    vitals["total"] = json!(6); // the whole search (a total of 7 would say one is unread)
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
    // Keys left out (the EHR chose not to fetch them, or could not: CDS Hooks 2.0) are
    // fetched; a key answered `null` is not (the EHR has no data for it).
    let mut req = request(patient("1925-12-23"), Value::Null);
    let prefetch = req.prefetch.as_mut().unwrap();
    for key in ["conditions", "consciousness", "pregnancy", "vitals"] {
        prefetch.remove(key);
    }
    let missing = service.missing_prefetch(&req).unwrap();
    assert_eq!(
        missing,
        vec![
            (
                "conditions".to_owned(),
                "Condition?patient=1288992".to_owned()
            ),
            (
                "consciousness".to_owned(),
                "Observation?patient=1288992&code=http://loinc.org|67775-7,http://snomed.info/sct|1104441000000107&_sort=-date&_count=10"
                    .to_owned()
            ),
            (
                "pregnancy".to_owned(),
                "Observation?patient=1288992&code=http://loinc.org|82810-3,http://loinc.org|11449-6&_sort=-date&_count=1"
                    .to_owned()
            ),
            (
                "vitals".to_owned(),
                "Observation?patient=1288992&category=vital-signs&_sort=-date&_count=100"
                    .to_owned()
            ),
        ]
    );
    // Without the vitals (not fetched): every parameter unknown, not "none recorded".
    let out = service
        .evaluate_news2(&req, vec![], now(), &Limits::default())
        .unwrap();
    assert!(
        matches!(out.assessment, Assessment::Incomplete(ref i)
            if i.missing.is_empty() && i.unusable.len() == 7),
        "{:?}",
        out.assessment
    );
    assert!(
        !detail(&out).contains("no value recorded"),
        "{}",
        detail(&out)
    );
    // With what the caller fetched (the vitals; none of the other searches found anything):
    // scored.
    let fetched = Resource::from_value(&vitals_bundle(), &Limits::default()).unwrap();
    let none = || {
        Resource::from_value(
            &json!({"resourceType": "Bundle", "type": "searchset", "total": 0}),
            &Limits::default(),
        )
        .unwrap()
    };
    let out = service
        .evaluate_news2(
            &req,
            vec![
                ("vitals".to_owned(), fetched),
                ("conditions".to_owned(), none()),
                ("consciousness".to_owned(), none()),
                ("pregnancy".to_owned(), none()),
            ],
            now(),
            &Limits::default(),
        )
        .unwrap();
    assert_eq!(out.response.cards[0].indicator, Indicator::Critical);
    // Only the vitals fetched: the searches by code beside them (consciousness, pregnancy)
    // not read do not stop the score.
    let fetched = Resource::from_value(&vitals_bundle(), &Limits::default()).unwrap();
    let out = service
        .evaluate_news2(
            &req,
            vec![("vitals".to_owned(), fetched)],
            now(),
            &Limits::default(),
        )
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
    // Its prefetch cannot be rendered either: the message names the field (it named the
    // template's token as "not supported").
    for patient_id in [None, Some(json!(1288992)), Some(json!(""))] {
        let mut req = request(patient("1925-12-23"), vitals_bundle());
        req.prefetch.as_mut().unwrap().remove("consciousness");
        match patient_id {
            None => req.context.remove("patientId"),
            Some(v) => req.context.insert("patientId".into(), v),
        };
        let e = service.missing_prefetch(&req).unwrap_err();
        assert_eq!(
            e.to_string(),
            "context.patientId is missing, empty or not a string (the service's prefetch needs it)"
        );
    }
    let req = request(
        patient("1925-12-23"),
        json!({"resourceType": "Observation", "status": "final", "code": "not an object"}),
    );
    let e = service
        .evaluate_news2(&req, vec![], now(), &Limits::default())
        .unwrap_err();
    assert!(e.to_string().contains("prefetch \"vitals\""), "{e}");
}

fn detail(out: &nightingale_decision_support::service::News2Outcome) -> String {
    out.response.cards[0].detail.clone().unwrap_or_default()
}

/// Red-team finding: with the Conditions not read (no prefetch, an OperationOutcome in its
/// place, a failed fetch), the score was given as if the patient had none: a pregnancy or
/// a scale 2 prescription went unchecked without a word. The card now says so.
#[test]
fn a_score_without_the_conditions_says_they_were_not_checked() {
    use nightingale_decision_support::news2::ConditionsRead;
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let outcome = json!({"resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing"}]});
    let searchset = json!({"resourceType": "Bundle", "type": "searchset", "total": 0});
    // Left out (not fetched: unknown), an OperationOutcome (the fetch failed), none found
    // (`null`, CDS Hooks 2.0's "no data", or an empty searchset).
    for (conditions, read) in [
        (None, ConditionsRead::None),
        (Some(outcome), ConditionsRead::None),
        (Some(Value::Null), ConditionsRead::All),
        (Some(searchset.clone()), ConditionsRead::All),
    ] {
        let mut req = request(patient("1925-12-23"), vitals_bundle());
        let prefetch = req.prefetch.as_mut().unwrap();
        match &conditions {
            Some(c) => prefetch.insert("conditions".to_owned(), c.clone()),
            None => prefetch.remove("conditions"),
        };
        let conditions = conditions.unwrap_or(json!("left out"));
        let out = service
            .evaluate_news2(&req, vec![], now(), &Limits::default())
            .unwrap();
        let Assessment::Scored(s) = &out.assessment else {
            panic!("not scored: {:?}", out.assessment)
        };
        assert_eq!(s.conditions, read, "{conditions}");
        assert_eq!(
            detail(&out).contains("conditions were not available"),
            read == ConditionsRead::None,
            "{conditions}: {}",
            detail(&out)
        );
    }
    // What the caller fetched for the key counts as read.
    let req = request(patient("1925-12-23"), vitals_bundle());
    let fetched = Resource::from_value(&searchset, &Limits::default()).unwrap();
    let out = service
        .evaluate_news2(
            &req,
            vec![("conditions".to_owned(), fetched)],
            now(),
            &Limits::default(),
        )
        .unwrap();
    let Assessment::Scored(s) = &out.assessment else {
        panic!("not scored")
    };
    assert_eq!(s.conditions, ConditionsRead::All);
}

/// Red-team finding: a score was taken from one page of an Observation search whose
/// server did not sort it (page 1: vitals from hours ago; page 2, not read: an RR of 30
/// minutes ago). A search read in part now gives values only when its Observations come
/// newest first (what it lacks is then older than what it holds).
#[test]
fn one_page_of_an_unsorted_observation_search_gives_no_score() {
    use nightingale_decision_support::vitals::UnusableReason;
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let paged = |entries: Vec<Value>| {
        json!({"resourceType": "Bundle", "type": "searchset", "total": 40,
            "link": [{"relation": "next", "url": "http://hooks.smarthealthit.org:9080/Observation?page=2"}],
            "entry": entries})
    };
    let set = vitals_bundle()["entry"].as_array().unwrap().clone();
    // Newest first (all at 11:30, then an older RR at 09:00): what was not read is older.
    let mut sorted = set.clone();
    let mut old_rr = set[0].clone();
    old_rr["resource"]["effectiveDateTime"] = json!("2024-05-01T09:00:00Z");
    old_rr["resource"]["id"] = json!("old-rr");
    sorted.push(old_rr.clone());
    let out = service
        .evaluate_news2(
            &request(patient("1925-12-23"), paged(sorted)),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    assert!(
        matches!(&out.assessment, Assessment::Scored(s) if s.score.total == 16),
        "{:?}",
        out.assessment
    );
    // Newest first, but the page ends inside the 11:30 set (the rest of it, an oxygen
    // flow say, may be on the next page): a value at the last time read is not known latest.
    let out = service
        .evaluate_news2(
            &request(patient("1925-12-23"), paged(set.clone())),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    assert!(
        matches!(&out.assessment, Assessment::Incomplete(i) if i.unusable.len() == 7),
        "scored from a page that ends at the time of its values: {:?}",
        out.assessment
    );
    // Not newest first: the 09:00 RR before the 11:30 set. Nothing can be known latest.
    let mut unsorted = vec![old_rr];
    unsorted.extend(set.clone());
    let out = service
        .evaluate_news2(
            &request(patient("1925-12-23"), paged(unsorted)),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    let Assessment::Incomplete(i) = &out.assessment else {
        panic!("scored from an unsorted page: {:?}", out.assessment)
    };
    assert_eq!(i.unusable.len(), 7, "{i:?}");
    assert!(
        i.unusable
            .iter()
            .all(|u| u.reason == UnusableReason::NewerMayBeUnread)
    );
    assert!(
        detail(&out).contains("a newer value may be on a page that was not read"),
        "{}",
        detail(&out)
    );
    // Newest first, only pulse rates on the page read, which reaches back 2.5 hours of a
    // 12-hour look-back: the other parameters may be on the pages not read, which the card
    // says (it said "no value recorded in the look-back window": a review's finding).
    let pulses: Vec<Value> = set
        .iter()
        .filter(|e| e.to_string().contains("8867-4"))
        .cloned()
        .collect();
    assert_eq!(pulses.len(), 1);
    let mut older_pulse = pulses[0].clone();
    older_pulse["resource"]["effectiveDateTime"] = json!("2024-05-01T09:00:00Z");
    older_pulse["resource"]["id"] = json!("old-pulse");
    let out = service
        .evaluate_news2(
            &request(
                patient("1925-12-23"),
                paged(vec![pulses[0].clone(), older_pulse]),
            ),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    let Assessment::Incomplete(i) = &out.assessment else {
        panic!("scored from one page of pulses: {:?}", out.assessment)
    };
    assert_eq!(i.unusable.len(), 6, "{i:?}");
    assert!(
        i.unusable
            .iter()
            .all(|u| u.reason == UnusableReason::MayBeUnread),
        "{i:?}"
    );
    assert!(
        detail(&out).contains("none on the pages read")
            && !detail(&out).contains("no value recorded"),
        "{}",
        detail(&out)
    );
    // A first page of one entry, two days old: it cannot show its order (a search sorted
    // oldest first holds its newest values on the pages not read), so none of the seven is
    // "not recorded" (a re-attack's finding).
    let mut two_days = set[0].clone();
    two_days["resource"]["effectiveDateTime"] = json!("2024-04-29T12:00:00Z");
    let out = service
        .evaluate_news2(
            &request(patient("1925-12-23"), paged(vec![two_days])),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    let Assessment::Incomplete(i) = &out.assessment else {
        panic!("scored from one old entry: {:?}", out.assessment)
    };
    assert_eq!(i.unusable.len(), 7, "{i:?}");
    assert!(
        i.unusable
            .iter()
            .all(|u| u.reason == UnusableReason::MayBeUnread),
        "{i:?}"
    );
    // The whole search (no next link, total = matches): scored whatever the order.
    let mut whole = vitals_bundle();
    whole["entry"]
        .as_array_mut()
        .unwrap()
        .insert(0, set[0].clone());
    whole["entry"][0]["resource"]["effectiveDateTime"] = json!("2024-05-01T09:00:00Z");
    whole["total"] = json!(8);
    let out = service
        .evaluate_news2(
            &request(patient("1925-12-23"), whole),
            vec![],
            now(),
            &Limits::default(),
        )
        .unwrap();
    assert!(matches!(&out.assessment, Assessment::Scored(_)));
}

/// Red-team finding: one malformed entry unrelated to NEWS2 (a lab result whose value is a
/// string, a status outside FHIR's codes) made the whole call a 400, so no card at all (a
/// score of 9 among them). The entry is now kept as unreadable: a score is given when it
/// cannot be one of the seven parameters' latest values, and a parameter it may be the
/// latest of is named unusable.
#[test]
fn a_malformed_entry_is_in_doubt_not_a_failed_call() {
    use nightingale_decision_support::vitals::{Parameter, UnusableReason};
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let with = |extra: Value| {
        let mut vitals = vitals_bundle();
        vitals["entry"]
            .as_array_mut()
            .unwrap()
            .push(json!({"resource": extra}));
        vitals["total"] = json!(8);
        service
            .evaluate_news2(
                &request(patient("1925-12-23"), vitals),
                vec![],
                now(),
                &Limits::default(),
            )
            .unwrap()
            .assessment
    };
    let lab = |code: &str, time: &str, fields: Value| {
        let mut o = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "effectiveDateTime": time});
        o.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        o
    };
    // A glucose with its value written as a string, or a status outside the value set.
    for bad in [
        lab(
            "2345-7",
            "2024-05-01T11:50:00Z",
            json!({"valueQuantity": "5.5"}),
        ),
        lab("2345-7", "2024-05-01T11:50:00Z", json!({"status": "draft"})),
    ] {
        let a = with(bad.clone());
        assert!(
            matches!(&a, Assessment::Scored(s) if s.score.total == 16),
            "{bad}: {a:?}"
        );
    }
    // A respiration rate newer than the one read, malformed: that parameter is in doubt.
    let a = with(lab(
        "9279-1",
        "2024-05-01T11:50:00Z",
        json!({"valueQuantity": {"value": "30"}}),
    ));
    let Assessment::Incomplete(i) = &a else {
        panic!("scored past a newer unreadable RR: {a:?}")
    };
    assert_eq!(i.unusable.len(), 1, "{i:?}");
    assert_eq!(i.unusable[0].parameter, Parameter::RespirationRate);
    assert_eq!(i.unusable[0].reason, UnusableReason::UnreadableObservation);
    // Older than the value read (or older than the look-back): no doubt.
    for time in ["2024-05-01T10:00:00Z", "2024-04-29T10:00:00Z"] {
        let a = with(lab(
            "9279-1",
            time,
            json!({"valueQuantity": {"value": "30"}}),
        ));
        assert!(matches!(&a, Assessment::Scored(_)), "{time}: {a:?}");
    }
    // An entry whose code cannot be read either: any parameter's latest may be it.
    let a = with(
        json!({"resourceType": "Observation", "status": "final", "code": 7,
        "effectiveDateTime": "2024-05-01T11:50:00Z"}),
    );
    assert!(
        matches!(&a, Assessment::Incomplete(i) if i.unusable.len() == 7),
        "{a:?}"
    );
    // A top-level prefetch resource that cannot be read is still the EHR's error (400);
    // under a key the service does not declare, it is not read at all.
    let mut req = request(patient("1925-12-23"), vitals_bundle());
    req.prefetch.as_mut().unwrap().insert(
        "extra".into(),
        lab("2345-7", "2024-05-01T11:50:00Z", json!({"status": "draft"})),
    );
    assert!(
        service
            .evaluate_news2(&req, vec![], now(), &Limits::default())
            .is_ok()
    );
    req.prefetch.as_mut().unwrap().insert(
        "pregnancy".into(),
        lab("2345-7", "2024-05-01T11:50:00Z", json!({"status": "draft"})),
    );
    assert!(
        service
            .evaluate_news2(&req, vec![], now(), &Limits::default())
            .is_err()
    );
}

/// `resource`s as one page of a longer searchset (a `next` link, a `total` above them).
fn first_page(resources: Vec<Value>) -> Value {
    let n = resources.len();
    json!({"resourceType": "Bundle", "type": "searchset", "total": n + 5,
        "link": [{"relation": "next", "url": "http://hooks.smarthealthit.org:9080/Observation?page=2"}],
        "entry": resources.into_iter()
            .map(|r| json!({"search": {"mode": "match"}, "resource": r}))
            .collect::<Vec<_>>()})
}

fn alert_at(time: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "67775-7"}]},
        "subject": {"reference": "Patient/1288992"}, "effectiveDateTime": time,
        "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "248234008"}]}})
}

/// Red-team finding: a search read in part (a `next` link) made every vital sign older than
/// its last value doubtful, though its other pages can hold only what it searched for: ten
/// ACVPU readings in the consciousness search's first page (neuro obs every 15 minutes) left
/// the 11:30 vitals "not calculated". Likewise a pregnancy-status search of one page.
#[test]
fn a_search_read_in_part_doubts_only_what_it_searched_for() {
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let score = |key: &str, page: Value| {
        let mut req = request(patient("1925-12-23"), vitals_bundle());
        req.prefetch.as_mut().unwrap().insert(key.to_owned(), page);
        service
            .evaluate_news2(&req, vec![], now(), &Limits::default())
            .unwrap()
            .assessment
    };
    // Ten Alerts, 11:55 back to 11:46, newest first: their next page is older than 11:46,
    // and holds only ACVPU readings; the 11:30 set is still the latest of the rest.
    let alerts: Vec<Value> = (0..10)
        .map(|i| alert_at(&format!("2024-05-01T11:{:02}:00Z", 55 - i)))
        .collect();
    let a = score("consciousness", first_page(alerts));
    let Assessment::Scored(s) = &a else {
        panic!("not scored: {a:?}")
    };
    // The newest consciousness (Alert, 11:55) replaced new confusion (3): 16 − 3.
    assert_eq!(s.score.total, 13, "{a:?}");
    // A pregnancy-status page ("Not pregnant", dated by its day) says nothing of vitals.
    let status = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "82810-3"}]},
        "subject": {"reference": "Patient/1288992"}, "effectiveDateTime": "2024-05-01",
        "valueCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "LA26683-5"}]}});
    let mut req = request(patient("1990-12-23"), vitals_bundle());
    req.prefetch
        .as_mut()
        .unwrap()
        .insert("pregnancy".to_owned(), first_page(vec![status]));
    let a = service
        .evaluate_news2(&req, vec![], now(), &Limits::default())
        .unwrap()
        .assessment;
    assert!(matches!(a, Assessment::Scored(_)), "{a:?}");
    // The vitals search itself read in part still doubts its values as old as its last (a
    // set charted at one time may be split across its pages).
    let mut page = vitals_bundle();
    page["link"] = json!([{"relation": "next", "url": "http://x/Observation?page=2"}]);
    page["total"] = json!(20);
    let mut req = request(patient("1925-12-23"), page);
    req.prefetch.as_mut().unwrap().insert(
        "consciousness".to_owned(),
        first_page(vec![alert_at("2024-05-01T11:00:00Z")]),
    );
    let a = service
        .evaluate_news2(&req, vec![], now(), &Limits::default())
        .unwrap()
        .assessment;
    let Assessment::Incomplete(i) = &a else {
        panic!("{a:?}")
    };
    assert!(
        i.unusable
            .iter()
            .any(|u| u.reason
                == nightingale_decision_support::vitals::UnusableReason::NewerMayBeUnread),
        "{a:?}"
    );
}

/// Red-team finding: the consciousness search failed (HTTP 503) while the vitals search held
/// an older "Alert": NEWS2 0, "low", scored from it, with no word of the search not read (new
/// confusion alone scores 3). A search asked for and not read leaves what it may hold
/// unknown; one that found nothing would be "no value recorded".
#[test]
fn a_search_that_could_not_be_read_is_not_nothing_recorded() {
    use nightingale_decision_support::service::Fetched;
    use nightingale_decision_support::vitals::{Parameter, UnusableReason};
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let req = request(patient("1925-12-23"), vitals_bundle());
    let out = service
        .evaluate_news2(
            &req,
            Fetched {
                resources: vec![],
                failed: vec!["consciousness".to_owned()],
            },
            now(),
            &Limits::default(),
        )
        .unwrap();
    let Assessment::Incomplete(i) = &out.assessment else {
        panic!(
            "scored without the consciousness search: {:?}",
            out.assessment
        )
    };
    assert_eq!(i.unusable.len(), 1, "{i:?}");
    assert_eq!(i.unusable[0].parameter, Parameter::Consciousness);
    assert_eq!(i.unusable[0].reason, UnusableReason::SearchNotRead);
    assert!(
        detail(&out).contains("was not answered, by the prefetch or by the EHR's FHIR server"),
        "{}",
        detail(&out)
    );
    // The vitals search failed: every parameter is unusable for that reason, not "no value
    // recorded in the look-back window".
    let mut req = request(patient("1925-12-23"), Value::Null);
    req.prefetch.as_mut().unwrap().remove("vitals");
    let out = service
        .evaluate_news2(
            &req,
            Fetched {
                resources: vec![],
                failed: vec!["vitals".to_owned()],
            },
            now(),
            &Limits::default(),
        )
        .unwrap();
    let Assessment::Incomplete(i) = &out.assessment else {
        panic!("{:?}", out.assessment)
    };
    assert!(i.missing.is_empty(), "{i:?}");
    assert_eq!(i.unusable.len(), 7, "{i:?}");
    assert!(
        i.unusable
            .iter()
            .all(|u| u.reason == UnusableReason::SearchNotRead)
    );
    assert!(
        !detail(&out).contains("no value recorded"),
        "{}",
        detail(&out)
    );
}

/// Red-team finding: an OperationOutcome in a search's place (CDS Hooks 2.0: what a client
/// SHOULD send when its prefetch failed), prefetched or fetched, was read as an empty search:
/// the consciousness key's let an older "Alert" be scored, the vitals key's said "no value
/// recorded". It is a search not read. And a pregnancy-status search that could not be read
/// is named on the card (pregnancy was then checked against the Conditions only).
#[test]
fn an_operation_outcome_in_a_searchs_place_is_a_search_not_read() {
    use nightingale_decision_support::vitals::{Parameter, UnusableReason};
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let outcome = json!({"resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout"}]});
    let with = |key: &str, value: Value| {
        let mut req = request(patient("1925-12-23"), vitals_bundle());
        req.prefetch.as_mut().unwrap().insert(key.to_owned(), value);
        service
            .evaluate_news2(&req, vec![], now(), &Limits::default())
            .unwrap()
    };
    let out = with("consciousness", outcome.clone());
    let Assessment::Incomplete(i) = &out.assessment else {
        panic!("scored: {:?}", out.assessment)
    };
    assert_eq!(i.unusable.len(), 1, "{i:?}");
    assert_eq!(i.unusable[0].parameter, Parameter::Consciousness);
    assert_eq!(i.unusable[0].reason, UnusableReason::SearchNotRead);
    // Fetched (a 200 whose body is an OperationOutcome) counts the same.
    let req = request(patient("1925-12-23"), vitals_bundle());
    let fetched = Resource::from_value(&outcome, &Limits::default()).unwrap();
    let a = service
        .evaluate_news2(
            &req,
            vec![("consciousness".to_owned(), fetched)],
            now(),
            &Limits::default(),
        )
        .unwrap()
        .assessment;
    assert!(matches!(a, Assessment::Incomplete(_)), "{a:?}");
    // Nor does a Bundle that is not a search's answer: a batch-response whose search failed,
    // a collection, or a searchset reporting an error outcome (red-team: each was read as
    // an empty search, and the older Alert scored).
    for answer in [
        json!({"resourceType": "Bundle", "type": "batch-response",
            "entry": [{"response": {"status": "500", "outcome": outcome.clone()}}]}),
        json!({"resourceType": "Bundle", "type": "collection", "entry": []}),
        json!({"resourceType": "Bundle", "type": "searchset", "total": 0,
            "entry": [{"search": {"mode": "outcome"}, "resource": outcome.clone()}]}),
    ] {
        let out = with("consciousness", answer.clone());
        assert!(
            matches!(out.assessment, Assessment::Incomplete(_)),
            "{answer}: {:?}",
            out.assessment
        );
    }
    // A searchset with a warning outcome is still an answer.
    let warning = json!({"resourceType": "Bundle", "type": "searchset", "total": 0,
        "entry": [{"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome",
            "issue": [{"severity": "warning", "code": "informational"}]}}]});
    assert!(matches!(
        with("consciousness", warning).assessment,
        Assessment::Scored(_)
    ));
    // The vitals key: every parameter unusable, none "no value recorded".
    let out = with("vitals", outcome.clone());
    assert!(
        !detail(&out).contains("no value recorded"),
        "{}",
        detail(&out)
    );
    // The pregnancy key: scored (the Conditions say nothing), with the card saying so.
    let mut req = request(patient("1990-12-23"), vitals_bundle());
    req.prefetch
        .as_mut()
        .unwrap()
        .insert("pregnancy".to_owned(), outcome);
    req.prefetch.as_mut().unwrap().insert(
        "conditions".to_owned(),
        json!({"resourceType": "Bundle", "type": "searchset", "total": 0}),
    );
    let out = service
        .evaluate_news2(&req, vec![], now(), &Limits::default())
        .unwrap();
    assert!(
        matches!(out.assessment, Assessment::Scored(_)),
        "{:?}",
        out.assessment
    );
    assert!(
        detail(&out).contains("pregnancy status could not be read"),
        "{}",
        detail(&out)
    );
}

/// A prefetch template naming an optional context field (patient-view's `encounterId`) that
/// a call does not have cannot be fetched: its key is left unread, and the call is answered
/// (it was refused 400 "context.encounterId is missing" whatever else it held: a review's
/// finding). The hook's own required field (`patientId`) missing is still the call's error
/// (`bad_requests_are_errors_not_cards`).
#[test]
fn a_template_naming_an_optional_context_field_the_call_lacks_leaves_its_key_unread() {
    use nightingale_decision_support::service::CdsSection;
    let mut config = CdsSection::default().services.remove(0);
    let mut prefetch = nightingale_decision_support::service::news2_prefetch();
    prefetch.insert(
        "encounter".into(),
        "Encounter/{{context.encounterId}}".into(),
    );
    // CDS Hooks 2.0's user tokens: the id of `context.userId` when of their type (the call's
    // user is `Practitioner/example`); they were refused as unsupported at start-up.
    prefetch.insert("me".into(), "Practitioner/{{userPractitionerId}}".into());
    prefetch.insert(
        "role".into(),
        "PractitionerRole?_id={{userPractitionerRoleId}}".into(),
    );
    config.prefetch = Some(prefetch);
    let services = CdsSection {
        services: vec![config],
    }
    .validate()
    .unwrap();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let mut req = request(patient("1925-12-23"), vitals_bundle());
    req.context.remove("encounterId");
    assert_eq!(
        service.missing_prefetch(&req).unwrap(),
        vec![("me".to_owned(), "Practitioner/example".to_owned())]
    );
    let out = service
        .evaluate_news2(&req, vec![], now(), &Limits::default())
        .unwrap();
    assert_eq!(out.response.cards[0].indicator, Indicator::Critical);
    // With the field, the key is fetched.
    let req = request(patient("1925-12-23"), vitals_bundle());
    assert_eq!(
        service.missing_prefetch(&req).unwrap(),
        vec![
            ("encounter".to_owned(), "Encounter/89284".to_owned()),
            ("me".to_owned(), "Practitioner/example".to_owned())
        ]
    );
}
