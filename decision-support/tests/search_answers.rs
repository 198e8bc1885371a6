//! What a search's answer says about what it did not return: an OperationOutcome warning that
//! results were left out (FHIR R4 IssueType `incomplete`, `suppressed`, `too-costly`), an
//! answer of another resource type, a match without its resource, an Observation entry that
//! could not be read. None of them may read as "none found" (a red-team review's findings).
//! Expected values follow FHIR R4 (Bundle, OperationOutcome) and the mapping's documented
//! rules (docs/cds-hooks.md), not the code under test.

use nightingale_decision_support::fhir::{Limits, Resource, Resources};
use nightingale_decision_support::hooks::HookRequest;
use nightingale_decision_support::news2::{Assessment, ConditionsRead, News2Settings, assess};
use nightingale_decision_support::risk::{Missing, map_features};
use nightingale_decision_support::service::{DEFAULT_NEWS2_ID, Service, Services};
use nightingale_decision_support::vitals::{Parameter, UnusableReason};
use nightingale_models::manifest::FeatureSpec;
use serde_json::{Value, json};

mod support;

use support::{LOINC, SNOMED, UCUM, hook_request, icu_risk_service, mapping_context, now};

const ACTIVE: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";

/// A risk service with the ICU bundle's kinds of source: systolic pressure, infection,
/// emergency admission; its prefetch searches each type.
fn risk_service() -> Services {
    #[derive(serde::Deserialize)]
    struct Doc {
        cds: nightingale_decision_support::service::CdsSection,
    }
    let text = icu_risk_service(
        r#"
        [cds.services.prefetch]
        patient = "Patient/{{context.patientId}}"
        observations = "Observation?patient={{context.patientId}}&code=http://loinc.org|8480-6&_sort=-date&_count=100"
        conditions = "Condition?patient={{context.patientId}}"
        encounters = "Encounter?patient={{context.patientId}}&status=arrived,triaged,in-progress,onleave"
        "#,
    );
    toml::from_str::<Doc>(&text)
        .unwrap()
        .cds
        .validate()
        .unwrap()
}

fn features() -> Vec<FeatureSpec> {
    support::features(&["systolic_bp", "infection", "emergency"])
}

fn sbp(value: f64, time: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": time,
        "valueQuantity": {"value": value, "system": UCUM, "code": "mm[Hg]"}})
}

/// An active Condition of p1 that is not an infection (essential hypertension).
fn hypertension() -> Value {
    json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
        "clinicalStatus": {"coding": [{"system": ACTIVE, "code": "active"}]},
        "code": {"coding": [{"system": SNOMED, "code": "59621000"}]}})
}

fn emergency_encounter() -> Value {
    json!({"resourceType": "Encounter", "id": "e1", "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
        "subject": {"reference": "Patient/p1"}})
}

/// An OperationOutcome entry of a searchset (`search.mode` `outcome`) with one issue.
fn outcome(severity: &str, code: &str) -> Value {
    json!({"search": {"mode": "outcome"}, "resource": {"resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code,
            "diagnostics": "Some results were not returned"}]}})
}

/// A searchset of `resources` as matches, then `extra` entries as they are.
fn searchset(resources: Vec<Value>, extra: Vec<Value>) -> Value {
    let mut entry: Vec<Value> = resources
        .into_iter()
        .map(|r| json!({"search": {"mode": "match"}, "resource": r}))
        .collect();
    entry.extend(extra);
    json!({"resourceType": "Bundle", "type": "searchset", "entry": entry})
}

fn request(prefetch: Value) -> HookRequest {
    hook_request("p1", prefetch)
}

/// The prefetch of every key, each a whole answer: SBP 120 at 11:00, hypertension, one
/// emergency encounter.
fn whole() -> Value {
    json!({
        "patient": {"resourceType": "Patient", "id": "p1", "birthDate": "1950-06-15", "gender": "female"},
        "observations": searchset(vec![sbp(120.0, "2024-05-01T11:00:00Z")], vec![]),
        "conditions": searchset(vec![hypertension()], vec![]),
        "encounters": searchset(vec![emergency_encounter()], vec![]),
    })
}

/// [`whole`] with the answer of `key` replaced by `answer`.
fn whole_but(key: &str, answer: Value) -> Value {
    let mut p = whole();
    p[key] = answer;
    p
}

/// The mapped features (systolic bp, infection, emergency) of a risk call with `prefetch`.
fn map(service: &Service, prefetch: Value) -> (Vec<Result<f64, Missing>>, bool, Resources) {
    let (resources, conditions_read) = service
        .collect(&request(prefetch), vec![], &Limits::default())
        .unwrap();
    let cx = mapping_context(conditions_read);
    let m = map_features(&features(), &resources, &cx);
    (
        m.features.into_iter().map(|f| f.value).collect(),
        conditions_read,
        resources,
    )
}

/// The mapped features and resources of a risk call whose Condition search answered
/// `conditions`, asserting that the patient's Conditions were not read: "no infection" is
/// not known (`case` names the call in a failure).
#[track_caller]
fn conditions_not_read(
    service: &Service,
    conditions: Value,
    case: &str,
) -> (Vec<Result<f64, Missing>>, Resources) {
    let (v, read, r) = map(service, whole_but("conditions", conditions));
    assert!(!read, "{case}");
    assert_eq!(v[1], Err(Missing::NoConditions), "{case}");
    (v, r)
}

#[test]
fn the_whole_answer_is_read_as_before() {
    let services = risk_service();
    let (v, read, _) = map(services.get("icu").unwrap(), whole());
    assert!(read);
    assert_eq!(v, vec![Ok(120.0), Ok(0.0), Ok(1.0)]);
}

/// Finding 1: a searchset with an OperationOutcome saying results were left out, at any
/// severity, is a search read in part: "no infection" is not known, an older value is not
/// known to be the latest, and "the only current encounter" is not known.
#[test]
fn an_outcome_saying_results_were_left_out_is_a_search_read_in_part() {
    let services = risk_service();
    let service = services.get("icu").unwrap();
    for code in ["incomplete", "suppressed", "too-costly"] {
        for severity in ["warning", "information"] {
            let left_out = || vec![outcome(severity, code)];
            // Conditions: "no" becomes not known.
            let case = format!("{code} {severity}");
            let answer = searchset(vec![hypertension()], left_out());
            let (v, r) = conditions_not_read(service, answer, &case);
            assert!(!r.is_complete("Condition"), "{code} {severity}");
            // Only the searched type is in doubt.
            assert_eq!(v[0], Ok(120.0), "{code} {severity}");
            assert_eq!(v[2], Ok(1.0), "{code} {severity}");
            // Observations: one value on the page, nothing to say the rest is older; nothing
            // on the page: not "no recent result".
            for (page, why) in [
                (
                    vec![sbp(120.0, "2024-05-01T08:00:00Z")],
                    UnusableReason::NewerMayBeUnread,
                ),
                (vec![], UnusableReason::MayBeUnread),
            ] {
                let (v, _, _) = map(
                    service,
                    whole_but("observations", searchset(page, left_out())),
                );
                assert_eq!(v[0], Err(Missing::Unusable(why)), "{code} {severity}");
            }
            // Encounters: another in progress may have been left out.
            let p = whole_but(
                "encounters",
                searchset(vec![emergency_encounter()], left_out()),
            );
            let (v, _, _) = map(service, p);
            assert!(
                matches!(&v[2], Err(Missing::Encounter(why)) if why.contains("only partly")),
                "{code} {severity}: {:?}",
                v[2]
            );
        }
    }
    // Unlike pages not read (an older tail), what a server left out may be the newest
    // (`suppressed`: withheld for privacy): values that came newest first (11:00, then
    // 10:00) are not used either (a re-attack: a card scored around a withheld value).
    for code in ["incomplete", "suppressed"] {
        let p = whole_but(
            "observations",
            searchset(
                vec![
                    sbp(130.0, "2024-05-01T11:00:00Z"),
                    sbp(120.0, "2024-05-01T10:00:00Z"),
                ],
                vec![outcome("warning", code)],
            ),
        );
        assert_eq!(
            map(service, p).0[0],
            Err(Missing::Unusable(UnusableReason::NewerMayBeUnread)),
            "{code}"
        );
    }
    // A page of the searched type with an `_include`d resource whose `search.mode` the
    // server left out is a whole answer (such entries made it "not answered": a re-attack's
    // finding); a resource of another type that says `match` still breaks it.
    let mut page = searchset(vec![hypertension()], vec![]);
    page["entry"]
        .as_array_mut()
        .unwrap()
        .push(json!({"resource": {"resourceType": "Patient", "id": "p1"}}));
    let (v, read, _) = map(service, whole_but("conditions", page.clone()));
    assert!(read);
    assert_eq!(v[1], Ok(0.0));
    page["entry"][1]["search"] = json!({"mode": "match"});
    let (_, read, _) = map(service, whole_but("conditions", page));
    assert!(!read);
    // An outcome of another code (a plain note) says nothing was left out.
    for (severity, code) in [("information", "informational"), ("warning", "processing")] {
        let p = whole_but(
            "conditions",
            searchset(vec![hypertension()], vec![outcome(severity, code)]),
        );
        let (v, read, _) = map(service, p);
        assert!(read, "{code}");
        assert_eq!(v[1], Ok(0.0), "{code}");
    }
}

/// Finding 1, NEWS2: the same rule on its Condition and vital-sign searches.
#[test]
fn news2_reads_an_outcome_saying_results_were_left_out_as_a_search_read_in_part() {
    let services = Services::builtin();
    let service = services.get(DEFAULT_NEWS2_ID).unwrap();
    let vitals: Value =
        serde_json::from_str(include_str!("fixtures/news2-vitals-bundle.json")).unwrap();
    let mut patient: Value = serde_json::from_str(include_str!("fixtures/patient.json")).unwrap();
    patient["birthDate"] = json!("1925-12-23");
    let call = |vitals: Value, conditions: Value| {
        let r: HookRequest = hook_request(
            "1288992",
            json!({"patient": patient.clone(), "vitals": vitals, "conditions": conditions,
                "consciousness": null, "pregnancy": null}),
        );
        service
            .evaluate_news2(&r, vec![], now(), &Limits::default())
            .unwrap()
            .assessment
    };
    let no_conditions = searchset(vec![], vec![]);
    let Assessment::Scored(s) = call(vitals.clone(), no_conditions.clone()) else {
        panic!("the fixture is scored")
    };
    assert_eq!(s.conditions, ConditionsRead::All);
    // Conditions with an `incomplete` warning: pregnancy and scale 2 were not checked
    // against all of them.
    let partial = searchset(vec![], vec![outcome("warning", "incomplete")]);
    let Assessment::Scored(s) = call(vitals.clone(), partial) else {
        panic!("still scored")
    };
    assert_eq!(s.conditions, ConditionsRead::OnePage);
    // Vitals with a `suppressed` warning: every value is of one time, so nothing says what
    // was left out is older; no score.
    let mut suppressed = vitals.clone();
    suppressed["entry"]
        .as_array_mut()
        .unwrap()
        .push(outcome("warning", "suppressed"));
    let Assessment::Incomplete(i) = call(suppressed, no_conditions) else {
        panic!("a search read in part is not scored")
    };
    assert_eq!(i.unusable.len(), 7, "{i:?}");
    assert!(
        i.unusable
            .iter()
            .all(|u| u.reason == UnusableReason::NewerMayBeUnread)
    );
}

/// Finding 3: a search answered with resources of another type is a broken answer, not
/// "every Condition read, none found" or "no recent result".
#[test]
fn an_answer_of_another_type_is_a_search_not_read() {
    let services = risk_service();
    let service = services.get("icu").unwrap();
    // Observations under the Condition key.
    let answer = searchset(vec![sbp(120.0, "2024-05-01T11:00:00Z")], vec![]);
    let (_, r) = conditions_not_read(service, answer, "observations");
    assert!(r.is_unread("Condition"));
    // Conditions under the Observation key.
    let p = whole_but("observations", searchset(vec![hypertension()], vec![]));
    let (v, _, _) = map(service, p);
    assert_eq!(v[0], Err(Missing::Unusable(UnusableReason::SearchNotRead)));
    // A mixed answer (a Condition and an Observation as matches) is no answer either.
    let answer = searchset(
        vec![hypertension(), sbp(120.0, "2024-05-01T11:00:00Z")],
        vec![],
    );
    conditions_not_read(service, answer, "mixed");
    // Resources added by `_include` (mode `include`) may be of any type.
    let mut conditions = searchset(vec![hypertension()], vec![]);
    conditions["entry"].as_array_mut().unwrap().push(json!(
        {"search": {"mode": "include"}, "resource": {"resourceType": "Patient", "id": "p1"}}));
    let (v, read, _) = map(service, whole_but("conditions", conditions));
    assert!(read);
    assert_eq!(v[1], Ok(0.0));
}

/// Finding 3: a match of only a `fullUrl` (its resource not sent) is not a whole read, and
/// an OperationOutcome without a `search.mode` is no match to count against `total`.
#[test]
fn a_match_without_its_resource_is_not_a_whole_read() {
    let services = risk_service();
    let service = services.get("icu").unwrap();
    let answer = searchset(
        vec![hypertension()],
        vec![
            json!({"fullUrl": "https://ehr.example/fhir/Condition/c9", "search": {"mode": "match"}}),
        ],
    );
    conditions_not_read(service, answer, "a match of a fullUrl");
    // The same without a mode (a match by default).
    let p = whole_but(
        "conditions",
        searchset(
            vec![hypertension()],
            vec![json!({"fullUrl": "https://ehr.example/fhir/Condition/c9"})],
        ),
    );
    assert!(!map(service, p).1);
    // `total` 2 with one Condition and an OperationOutcome without a mode: one of two.
    let mut conditions = searchset(vec![hypertension()], vec![]);
    conditions["total"] = json!(2);
    conditions["entry"]
        .as_array_mut()
        .unwrap()
        .push(json!({"resource": {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational"}]}}));
    conditions_not_read(service, conditions, "an outcome without a mode");
}

/// Finding 4, NEWS2: a parameter whose only observation in the window could not be read is
/// said to be so, not "no value recorded"; one older than the window is not recorded.
#[test]
fn news2_names_an_observation_that_could_not_be_read() {
    let pulse = |value: Value, status: &str, time: &str| {
        json!({"resourceType": "Observation", "status": status,
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": time,
            "valueQuantity": {"value": value, "system": UCUM, "code": "/min"}})
    };
    let run = |entry: Value| {
        let bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1", "birthDate": "1950-01-01"}},
            {"resource": entry}]});
        let r = Resources::from(Resource::from_value(&bundle, &Limits::default()).unwrap());
        match assess(&r, now(), Some("p1"), &News2Settings::default()) {
            Assessment::Incomplete(i) => i,
            other => panic!("{other:?}"),
        }
    };
    for bad in [
        pulse(json!("95"), "final", "2024-05-01T11:00:00Z"),
        pulse(json!(95), "bogus", "2024-05-01T11:00:00Z"),
    ] {
        let i = run(bad);
        assert!(!i.missing.contains(&Parameter::PulseRate), "{i:?}");
        let u = i
            .unusable
            .iter()
            .find(|u| u.parameter == Parameter::PulseRate)
            .expect("pulse named");
        assert_eq!(u.reason, UnusableReason::UnreadableObservation);
        // The other parameters are not in doubt: no value recorded.
        assert!(i.missing.contains(&Parameter::Temperature));
    }
    // Older than the 12-hour window: no value recorded, as before.
    let i = run(pulse(json!("95"), "final", "2024-04-30T11:00:00Z"));
    assert!(i.missing.contains(&Parameter::PulseRate), "{i:?}");
}
