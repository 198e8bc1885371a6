//! NEWS2 from FHIR resources: a score only with every parameter, never for patients under
//! 16 or in pregnancy. Expected scores are summed by hand from RCP NEWS2 (2017) Chart 1.

use nightingale_decision_support::fhir::{Limits, Resource, Resources, SystemCode};
use nightingale_decision_support::news2::{
    AgeProblem, Assessment, ClinicalRisk, ConditionsRead, News2Settings, NotApplicable, SpO2Scale,
    assess,
};
use nightingale_decision_support::vitals::{Parameter, UnusableReason};
use serde_json::{Value, json};

mod support;

use support::{LOINC, SNOMED, UCUM, now};

const T: &str = "2024-05-01T11:00:00Z";

fn q(code: &str, value: f64, unit: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": T,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}})
}

fn coded(system: &str, code: &str, answer: Option<(&str, &str)>) -> Value {
    let mut v = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": T});
    if let Some((s, c)) = answer {
        v["valueCodeableConcept"] = json!({"coding": [{"system": s, "code": c}]});
    }
    v
}

fn condition(system: &str, code: &str) -> Value {
    json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "code": {"coding": [{"system": system, "code": code}]}})
}

fn patient(birth: &str) -> Value {
    json!({"resourceType": "Patient", "id": "p1", "birthDate": birth, "gender": "female"})
}

/// RR 22 (2), SpO2 95 (1 on scale 1), oxygen (2), SBP 105 (1), pulse 95 (1), alert (0),
/// 38.5 °C (1): 8, high.
fn vitals() -> Vec<Value> {
    vec![
        q("9279-1", 22.0, "/min"),
        q("59408-5", 95.0, "%"),
        coded(SNOMED, "371825009", None),
        q("8480-6", 105.0, "mm[Hg]"),
        q("8867-4", 95.0, "/min"),
        coded(LOINC, "67775-7", Some((SNOMED, "248234008"))),
        q("8310-5", 38.5, "Cel"),
    ]
}

fn resources(items: Vec<Value>) -> Resources {
    let bundle = json!({"resourceType": "Bundle", "type": "collection",
        "entry": items.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()});
    Resources::from(Resource::from_value(&bundle, &Limits::default()).unwrap())
}

fn run(items: Vec<Value>, settings: &News2Settings) -> Assessment {
    assess(&resources(items), now(), Some("p1"), settings)
}

#[test]
fn a_complete_set_is_scored() {
    let mut items = vec![patient("1950-01-01")];
    items.extend(vitals());
    let Assessment::Scored(s) = run(items, &News2Settings::default()) else {
        panic!("not scored")
    };
    assert_eq!(s.score.total, 8);
    assert_eq!(s.score.risk, ClinicalRisk::High);
    assert_eq!(s.score.scale, SpO2Scale::Scale1);
    assert_eq!(s.score.sub_score(Parameter::AirOrOxygen), 2);
    assert_eq!(
        s.vitals.time(Parameter::Temperature),
        Some(T.parse().unwrap())
    );
}

#[test]
fn scale_2_when_a_listed_condition_is_active() {
    let mut items = vec![
        patient("1950-01-01"),
        condition(SNOMED, "local-target-88-92"),
    ];
    items.extend(vitals());
    let settings = News2Settings {
        scale2_conditions: vec![SystemCode::new(SNOMED, "local-target-88-92")],
        ..Default::default()
    };
    let Assessment::Scored(s) = run(items.clone(), &settings) else {
        panic!("not scored")
    };
    // SpO2 95 on oxygen on scale 2 scores 2: 2+2+2+1+1+0+1 = 9.
    assert_eq!(s.score.scale, SpO2Scale::Scale2);
    assert_eq!(s.score.total, 9);
    // Without the setting, the same condition does nothing.
    let Assessment::Scored(s) = run(items, &News2Settings::default()) else {
        panic!("not scored")
    };
    assert_eq!(s.score.scale, SpO2Scale::Scale1);
}

/// A review's finding: an unconfirmed, provisional or differential diagnosis, an abated one
/// still marked active, and one that begins after now, each put a patient on air with SpO2
/// 86 % on scale 2 and took NEWS2 from 3 to 1. Scale 2 lowers the score: only a Condition
/// the record confirms, in force now, chooses it (no verification status given counts as the
/// EHR's record; `confirmed` in STU3's system too).
#[test]
fn scale_2_only_on_a_confirmed_condition_in_force_now() {
    let settings = News2Settings {
        scale2_conditions: vec![SystemCode::new(SNOMED, "65710008")],
        ..Default::default()
    };
    let verified = |system: &str, code: &str| {
        let mut c = condition(SNOMED, "65710008");
        c["verificationStatus"] = json!({"coding": [{"system": system, "code": code}]});
        c
    };
    let r4 = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
    let stu3 = "http://hl7.org/fhir/condition-ver-status";
    let with = |field: &str, value: &str| {
        let mut c = condition(SNOMED, "65710008");
        c[field] = json!(value);
        c
    };
    let cases = [
        (condition(SNOMED, "65710008"), SpO2Scale::Scale2),
        (verified(r4, "confirmed"), SpO2Scale::Scale2),
        (verified(stu3, "confirmed"), SpO2Scale::Scale2),
        (with("onsetDateTime", "2020-03-01"), SpO2Scale::Scale2),
        (verified(r4, "unconfirmed"), SpO2Scale::Scale1),
        (verified(r4, "provisional"), SpO2Scale::Scale1),
        (verified(r4, "differential"), SpO2Scale::Scale1),
        (
            verified("http://example.org/local", "confirmed"),
            SpO2Scale::Scale1,
        ),
        (with("abatementDateTime", "2024-01-01"), SpO2Scale::Scale1),
        (
            with("abatementString", "resolved on treatment"),
            SpO2Scale::Scale1,
        ),
        (with("onsetDateTime", "2025-06-01"), SpO2Scale::Scale1),
        (
            with("onsetDateTime", "2024-05-01T12:30:00Z"),
            SpO2Scale::Scale1,
        ),
        // A re-attack's findings: other ways of saying it has not begun, or has ended.
        (
            {
                let mut c = condition(SNOMED, "65710008");
                c["onsetPeriod"] = json!({"start": "2025-06-01"});
                c
            },
            SpO2Scale::Scale1,
        ),
        (with("recordedDate", "2025-06-01"), SpO2Scale::Scale1),
        (with("assertedDate", "2025-06-01"), SpO2Scale::Scale1),
        (with("recordedDate", "2024-04-01"), SpO2Scale::Scale2),
        (
            {
                let mut c = condition(SNOMED, "65710008");
                c["abatementBoolean"] = json!(true);
                c
            },
            SpO2Scale::Scale1,
        ),
        (
            {
                let mut c = condition(SNOMED, "65710008");
                c["abatementBoolean"] = json!(false);
                c
            },
            SpO2Scale::Scale2,
        ),
    ];
    for (c, want) in cases {
        let shown = c.to_string();
        let mut items = vec![patient("1950-01-01"), c];
        items.extend(vitals());
        items[3] = q("59408-5", 88.0, "%"); // SpO2
        items[4] = coded(SNOMED, "722742002", None); // breathing room air
        let Assessment::Scored(s) = run(items, &settings) else {
            panic!("not scored: {shown}")
        };
        assert_eq!(s.score.scale, want, "{shown}");
        // SpO2 88 on air: 3 on scale 1, 0 on scale 2 (88–92).
        let spo2 = if want == SpO2Scale::Scale2 { 0 } else { 3 };
        assert_eq!(
            s.score.sub_score(Parameter::OxygenSaturation),
            spo2,
            "{shown}"
        );
    }
    // Two copies of one Condition (the same id, no version to order them), one confirmed and
    // one provisional: scale 1, whatever their order.
    for order in [[0, 1], [1, 0]] {
        let copies = [verified(r4, "confirmed"), verified(r4, "provisional")];
        let mut items = vec![patient("1950-01-01")];
        for i in order {
            let mut c = copies[i].clone();
            c["id"] = json!("c1");
            items.push(c);
        }
        items.extend(vitals());
        items[4] = q("59408-5", 88.0, "%"); // after the patient and the two copies
        items[5] = coded(SNOMED, "722742002", None);
        let Assessment::Scored(s) = run(items, &settings) else {
            panic!("not scored")
        };
        assert_eq!(s.score.scale, SpO2Scale::Scale1, "{order:?}");
    }
}

/// A review's finding: a newer SpO2 of 99 % recorded with dataAbsentReason `error` replaced
/// the 85 % before it and took NEWS2 from 3 to 0. R4 obs-6 allows the reason only without a
/// value: such a value is unusable, named on the card, and the older one is not scored in its
/// place.
#[test]
fn a_value_given_with_a_data_absent_reason_is_unusable() {
    let mut items = vec![patient("1950-01-01")];
    items.extend(vitals());
    let mut erroneous = q("59408-5", 99.0, "%");
    erroneous["effectiveDateTime"] = json!("2024-05-01T11:30:00Z");
    erroneous["dataAbsentReason"] = json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "error"}]});
    items.push(erroneous);
    let Assessment::Incomplete(i) = run(items, &News2Settings::default()) else {
        panic!("scored a value marked absent")
    };
    assert_eq!(i.unusable.len(), 1);
    assert_eq!(i.unusable[0].parameter, Parameter::OxygenSaturation);
    assert_eq!(i.unusable[0].reason, UnusableReason::AbsentReasonWithValue);
}

#[test]
fn any_missing_parameter_means_no_score_and_says_which() {
    let mut items = vec![patient("1950-01-01")];
    let mut v = vitals();
    v.remove(2); // air or oxygen
    v.remove(5); // temperature (index after the removal)
    items.extend(v);
    let Assessment::Incomplete(i) = run(items, &News2Settings::default()) else {
        panic!("scored without every parameter")
    };
    assert_eq!(
        i.missing,
        vec![Parameter::AirOrOxygen, Parameter::Temperature]
    );
    assert!(i.unusable.is_empty());
    assert_eq!(i.age, None);
}

#[test]
fn an_unusable_latest_value_is_reported() {
    let mut items = vec![patient("1950-01-01")];
    let mut v = vitals();
    v[6] = q("8310-5", 101.3, "degF"); // "degF" is not UCUM ("[degF]" is)
    items.extend(v);
    let Assessment::Incomplete(i) = run(items, &News2Settings::default()) else {
        panic!("scored with an unusable value")
    };
    assert!(i.missing.is_empty());
    assert_eq!(i.unusable.len(), 1);
    assert_eq!(i.unusable[0].parameter, Parameter::Temperature);
    assert_eq!(i.unusable[0].reason, UnusableReason::Unit("degF".into()));
}

#[test]
fn under_sixteen_is_not_applicable() {
    // 16 on 2024-05-02: still 15 on 2024-05-01.
    let mut items = vec![patient("2008-05-02")];
    items.extend(vitals());
    assert_eq!(
        run(items, &News2Settings::default()),
        Assessment::NotApplicable(NotApplicable::UnderSixteen { age: 15 })
    );
    // 16 today: scored.
    let mut items = vec![patient("2008-05-01")];
    items.extend(vitals());
    assert!(matches!(
        run(items, &News2Settings::default()),
        Assessment::Scored(_)
    ));
    // Born in 2008, day unknown: 15 or 16: no score, and the reason is the age.
    let mut items = vec![patient("2008")];
    items.extend(vitals());
    let Assessment::Incomplete(i) = run(items, &News2Settings::default()) else {
        panic!("scored with an uncertain age")
    };
    assert_eq!(i.age, Some(AgeProblem::Imprecise));
    // Born after today.
    let mut items = vec![patient("2030-01-01")];
    items.extend(vitals());
    let Assessment::Incomplete(i) = run(items, &News2Settings::default()) else {
        panic!("a future birth date")
    };
    assert_eq!(i.age, Some(AgeProblem::MalformedBirthDate));
    // No Patient at all.
    let Assessment::Incomplete(i) = run(vitals(), &News2Settings::default()) else {
        panic!("scored without a patient")
    };
    assert_eq!(i.age, Some(AgeProblem::NoPatient));
}

#[test]
fn pregnancy_is_not_applicable() {
    let mut items = vec![patient("1990-01-01"), condition(SNOMED, "77386006")];
    items.extend(vitals());
    assert_eq!(
        run(items, &News2Settings::default()),
        Assessment::NotApplicable(NotApplicable::Pregnancy)
    );
    // A pregnancy-status observation (LOINC 82810-3, or the older 11449-6 with the same
    // answers, which was not read and the patient scored: a red-team finding) =
    // LA15173-0 Pregnant.
    for code in ["82810-3", "11449-6"] {
        let mut items = vec![
            patient("1990-01-01"),
            coded(LOINC, code, Some((LOINC, "LA15173-0"))),
        ];
        items.extend(vitals());
        assert_eq!(
            run(items, &News2Settings::default()),
            Assessment::NotApplicable(NotApplicable::Pregnancy),
            "{code}"
        );
        // "Not pregnant" (LA26683-5): scored.
        let mut items = vec![
            patient("1990-01-01"),
            coded(LOINC, code, Some((LOINC, "LA26683-5"))),
        ];
        items.extend(vitals());
        assert!(
            matches!(run(items, &News2Settings::default()), Assessment::Scored(_)),
            "{code}"
        );
    }
    // No clinical status, and an abatement after now (the expected delivery date): it has
    // not surely ended, so it may hold: not applicable (it was read as over, and scored: a
    // red-team finding). One that ended before now: scored.
    for (end, applicable) in [("2024-09-01", false), ("2024-03-01", true)] {
        let mut c = condition(SNOMED, "77386006");
        c.as_object_mut().unwrap().remove("clinicalStatus");
        c["abatementDateTime"] = json!(end);
        c["recordedDate"] = json!("2024-02-01");
        let mut items = vec![patient("1990-01-01"), c];
        items.extend(vitals());
        let got = run(items, &News2Settings::default());
        assert_eq!(
            matches!(got, Assessment::Scored(_)),
            applicable,
            "{end}: {got:?}"
        );
    }
    // A resolved pregnancy condition: scored.
    let mut resolved = condition(SNOMED, "77386006");
    resolved["clinicalStatus"]["coding"][0]["code"] = json!("resolved");
    let mut items = vec![patient("1990-01-01"), resolved];
    items.extend(vitals());
    assert!(matches!(
        run(items, &News2Settings::default()),
        Assessment::Scored(_)
    ));
}

#[test]
fn another_patients_observations_do_not_count() {
    let mut items = vec![patient("1950-01-01")];
    let mut v = vitals();
    v[0]["subject"]["reference"] = json!("Patient/p2");
    items.extend(v);
    let Assessment::Incomplete(i) = run(items, &News2Settings::default()) else {
        panic!("scored with another patient's value")
    };
    assert_eq!(i.missing, vec![Parameter::RespirationRate]);
}

#[test]
fn two_differing_records_of_the_patient_give_no_age_whatever_their_order() {
    // A red-team finding: the first of two Patient records of one id decided (under 16, or a
    // score, by the Bundle's order).
    for births in [["2015-01-01", "1950-01-01"], ["1950-01-01", "2015-01-01"]] {
        let mut items: Vec<Value> = births.iter().map(|b| patient(b)).collect();
        items.extend(vitals());
        let Assessment::Incomplete(i) = run(items, &News2Settings::default()) else {
            panic!("assessed from one of two differing Patient records")
        };
        assert_eq!(i.age, Some(AgeProblem::NoPatient));
    }
    // The same record twice: one patient.
    let mut items = vec![patient("1950-01-01"), patient("1950-01-01")];
    items.extend(vitals());
    assert!(matches!(
        run(items, &News2Settings::default()),
        Assessment::Scored(_)
    ));
}

/// RR 16 (0), SpO2 97 (0), air (0), SBP 120 (0), pulse 70 (0), alert (0), 37.0 °C (0): 0.
fn normal_vitals() -> Vec<Value> {
    vec![
        q("9279-1", 16.0, "/min"),
        q("59408-5", 97.0, "%"),
        coded(SNOMED, "722742002", None),
        q("8480-6", 120.0, "mm[Hg]"),
        q("8867-4", 70.0, "/min"),
        coded(LOINC, "67775-7", Some((SNOMED, "248234008"))),
        q("8310-5", 37.0, "Cel"),
    ]
}

#[test]
fn a_future_dated_newer_reading_is_never_hidden_behind_a_reassuring_score() {
    use nightingale_decision_support::cards::{Wording, news2_card};
    use nightingale_decision_support::hooks::Indicator;
    // Everything normal as of 11:00, plus SpO2 84 % (scale 1: 3, a red score) stamped
    // 12:20 when it is 12:00: beyond the 5-minute skew, so its time cannot be trusted. It
    // is still the newest SpO2, so the older 97 % must not be scored in its place.
    let mut spo2_84 = q("59408-5", 84.0, "%");
    spo2_84["effectiveDateTime"] = json!("2024-05-01T12:20:00Z");
    let mut items = vec![patient("1950-01-01"), spo2_84];
    items.extend(normal_vitals());
    // Without the future-dated value the set scores 0 (the baseline the bug gave).
    let Assessment::Scored(s) = run(
        items[..1].iter().chain(&items[2..]).cloned().collect(),
        &News2Settings::default(),
    ) else {
        panic!("baseline not scored")
    };
    assert_eq!(s.score.total, 0);
    let assessment = run(items, &News2Settings::default());
    let Assessment::Incomplete(i) = &assessment else {
        panic!("scored from the older SpO2 with a newer one left out: {assessment:?}")
    };
    assert!(i.missing.is_empty());
    assert_eq!(i.unusable.len(), 1);
    assert_eq!(i.unusable[0].parameter, Parameter::OxygenSaturation);
    assert_eq!(i.unusable[0].reason, UnusableReason::FutureTime);
    assert_eq!(i.future_dated, vec![Parameter::OxygenSaturation]);
    let card = news2_card(&assessment, &Wording::default());
    assert_eq!(card.summary, "NEWS2 not calculated: missing SpO2");
    assert_eq!(card.indicator, Indicator::Info);
    let detail = card.detail.unwrap();
    assert!(
        detail.contains("SpO2: latest value cannot be used (2024-05-01 12:20 UTC)"),
        "{detail}"
    );
    assert!(detail.contains("dated in the future"), "{detail}");
    assert!(
        detail.contains("check the device or charting clock"),
        "{detail}"
    );
}

/// `item` with its time replaced (`None`: no time at all).
fn at(mut item: Value, time: Option<&str>) -> Value {
    match time {
        Some(t) => item["effectiveDateTime"] = json!(t),
        None => {
            item.as_object_mut().unwrap().remove("effectiveDateTime");
        }
    }
    item
}

#[test]
fn a_newer_value_dated_only_by_its_day_is_never_passed_over_for_an_older_one() {
    use nightingale_decision_support::fhir::DateError;
    // Everything normal at 11:00, plus an SpO2 of 84 % (3 points on its own) whose time
    // cannot be read to the second. It may be the newest SpO2: the 97 % is not scored in
    // its place (it was, "NEWS2 0": a red-team finding).
    for (time, reason) in [
        (Some("2024-05-01"), UnusableReason::Time(DateError::NoTime)),
        (Some("2024-05"), UnusableReason::Time(DateError::NoTime)),
        (
            Some("2024-05-01T11:50:00"),
            UnusableReason::Time(DateError::Malformed),
        ),
        (
            Some("yesterday"),
            UnusableReason::Time(DateError::Malformed),
        ),
        (None, UnusableReason::NoTime),
        // A day that may still be going on somewhere (UTC-12:00) at 11:00 UTC.
        (Some("2024-04-30"), UnusableReason::Time(DateError::NoTime)),
    ] {
        let spo2 = at(q("59408-5", 84.0, "%"), time);
        for first in [true, false] {
            let mut items = vec![patient("1950-01-01")];
            let mut v = normal_vitals();
            if first {
                v.insert(0, spo2.clone());
            } else {
                v.push(spo2.clone());
            }
            items.extend(v);
            let assessment = run(items, &News2Settings::default());
            let Assessment::Incomplete(i) = &assessment else {
                panic!("{time:?}: scored from the older SpO2: {assessment:?}")
            };
            assert_eq!(i.unusable.len(), 1, "{time:?}");
            assert_eq!(i.unusable[0].parameter, Parameter::OxygenSaturation);
            assert_eq!(i.unusable[0].reason, reason, "{time:?}");
        }
    }
    // A day that ended everywhere before the dated 97 % was measured: the 97 % is the latest.
    let mut items = vec![patient("1950-01-01")];
    items.extend(normal_vitals());
    items.push(at(q("59408-5", 84.0, "%"), Some("2024-04-29")));
    let Assessment::Scored(s) = run(items, &News2Settings::default()) else {
        panic!("an SpO2 of two days ago hid today's")
    };
    assert_eq!(s.score.total, 0);
    // Undated beside nothing dated: still unusable (as before).
    let mut items = vec![patient("1950-01-01")];
    items.extend(
        normal_vitals()
            .into_iter()
            .filter(|o| o["code"]["coding"][0]["code"] != "59408-5"),
    );
    items.push(at(q("59408-5", 97.0, "%"), Some("2024-05-01")));
    assert!(matches!(
        run(items, &News2Settings::default()),
        Assessment::Incomplete(_)
    ));
}

#[test]
fn a_pregnancy_status_dated_by_its_day_counts() {
    let pregnant = || coded(LOINC, "82810-3", Some((LOINC, "LA15173-0")));
    let not_pregnant = || coded(LOINC, "82810-3", Some((LOINC, "LA26683-5")));
    let with = |statuses: Vec<Value>| {
        let mut items = vec![patient("1990-01-01")];
        items.extend(statuses);
        items.extend(vitals());
        run(items, &News2Settings::default())
    };
    let not_applicable = Assessment::NotApplicable(NotApplicable::Pregnancy);
    // "Pregnant", dated yesterday, this month, or not at all (the red-team case: a date
    // without a time was left out and the patient scored).
    for time in [
        Some("2024-04-30"),
        Some("2024-05"),
        Some("2024-04-30T09:00:00"),
        None,
    ] {
        assert_eq!(with(vec![at(pregnant(), time)]), not_applicable, "{time:?}");
    }
    // Outside the 280-day window: scored.
    assert!(matches!(
        with(vec![at(pregnant(), Some("2023-01-10"))]),
        Assessment::Scored(_)
    ));
    // "Not pregnant" dated by its day after a "Pregnant" of months ago: the later one.
    assert!(matches!(
        with(vec![
            at(pregnant(), Some("2024-01-10T10:00:00Z")),
            at(not_pregnant(), Some("2024-04-30")),
        ]),
        Assessment::Scored(_)
    ));
    // A "Pregnant" of today's date and a "Not pregnant" timed today: either may be the
    // later, so pregnant (whatever the order).
    for order in [false, true] {
        let mut statuses = vec![
            at(pregnant(), Some("2024-05-01")),
            at(not_pregnant(), Some("2024-05-01T10:00:00Z")),
        ];
        if order {
            statuses.reverse();
        }
        assert_eq!(with(statuses), not_applicable);
    }
    // Timed "Not pregnant" after a timed "Pregnant": scored, as before.
    assert!(matches!(
        with(vec![
            at(pregnant(), Some("2024-04-01T10:00:00Z")),
            at(not_pregnant(), Some("2024-05-01T10:00:00Z")),
        ]),
        Assessment::Scored(_)
    ));
}

#[test]
fn a_score_with_only_a_page_of_the_conditions_says_what_could_not_be_checked() {
    use nightingale_decision_support::cards::{Wording, news2_card};
    let mut items = vec![patient("1950-01-01")];
    items.extend(vitals());
    let mut r = resources(items.clone());
    // One page (1 of 30 Conditions, a next link): a pregnancy may be on another page.
    let page = json!({"resourceType": "Bundle", "type": "searchset", "total": 30,
        "link": [{"relation": "next", "url": "https://ehr.example/fhir/Condition?page=2"}],
        "entry": [{"search": {"mode": "match"}, "resource": condition(SNOMED, "59621000")}]});
    r.add(Resource::from_value(&page, &Limits::default()).unwrap());
    let a = assess(&r, now(), Some("p1"), &News2Settings::default());
    let Assessment::Scored(s) = &a else {
        panic!("not scored: {a:?}")
    };
    assert_eq!(s.conditions, ConditionsRead::OnePage);
    let detail = news2_card(&a, &Wording::default()).detail.unwrap();
    assert!(
        detail.contains("conditions were only partly available"),
        "{detail}"
    );
    // Every Condition read: no such note.
    let a = run(items, &News2Settings::default());
    let Assessment::Scored(s) = &a else {
        panic!("not scored")
    };
    assert_eq!(s.conditions, ConditionsRead::All);
    let detail = news2_card(&a, &Wording::default()).detail.unwrap();
    assert!(!detail.contains("partly available"), "{detail}");
}

/// Red-team finding: a pregnancy Condition whose clinical status cannot be read (none, as
/// encounter diagnoses often have; a code without its system) let NEWS2 score a pregnant
/// patient. Recorded before the pregnancy window, it no longer says pregnant.
#[test]
fn a_pregnancy_condition_of_unreadable_status_is_pregnancy() {
    let with = |status: Option<Value>, recorded: Option<&str>| {
        let mut c = condition(SNOMED, "77386006");
        match status {
            Some(s) => c["clinicalStatus"] = s,
            None => {
                c.as_object_mut().unwrap().remove("clinicalStatus");
            }
        }
        if let Some(r) = recorded {
            c["recordedDate"] = json!(r);
        }
        let mut items = vec![patient("1990-01-01"), c];
        items.extend(vitals());
        run(items, &News2Settings::default())
    };
    let pregnant = Assessment::NotApplicable(NotApplicable::Pregnancy);
    assert_eq!(with(None, None), pregnant);
    assert_eq!(with(None, Some("2024-03-01")), pregnant);
    assert_eq!(
        with(Some(json!({"coding": [{"code": "active"}]})), None),
        pregnant
    );
    assert_eq!(with(Some(json!({"text": "active"})), None), pregnant);
    assert!(matches!(
        with(None, Some("2021-03-01")),
        Assessment::Scored(_)
    ));
    assert!(matches!(
        with(Some(json!({"coding": [{"code": "resolved"}]})), None),
        Assessment::Scored(_)
    ));
}

/// Red-team finding: a patient recorded as deceased was scored "NEWS2 0".
#[test]
fn a_deceased_patient_is_not_scored() {
    for deceased in [
        json!({"deceasedBoolean": true}),
        json!({"deceasedDateTime": "2019-05-01"}),
    ] {
        let mut p = patient("1950-01-01");
        for (k, v) in deceased.as_object().unwrap() {
            p[k] = v.clone();
        }
        let mut items = vec![p];
        items.extend(vitals());
        assert_eq!(
            run(items, &News2Settings::default()),
            Assessment::NotApplicable(NotApplicable::Deceased)
        );
    }
    let mut p = patient("1950-01-01");
    p["deceasedBoolean"] = json!(false);
    let mut items = vec![p];
    items.extend(vitals());
    assert!(matches!(
        run(items, &News2Settings::default()),
        Assessment::Scored(_)
    ));
}

/// Red-team finding: thousands of copies of one Observation id (different values, the same
/// `meta`) were each weighed against every copy kept: 10,000 took 388 s of CPU and stalled
/// the server. At most `MAX_COPIES` are kept; one past them is an entry that could not be
/// read, so the parameter is in doubt rather than scored from the copies kept.
#[test]
fn a_flood_of_copies_of_one_id_is_bounded_and_leaves_the_parameter_in_doubt() {
    use nightingale_decision_support::fhir::MAX_COPIES;
    let mut items = vec![patient("1950-01-01")];
    items.extend(vitals());
    let flood = 9_000;
    for k in 0..flood {
        let mut o = q("59408-5", 90.0 + (k % 10) as f64 * 0.5, "%");
        o["id"] = json!("d");
        o["meta"] = json!({"lastUpdated": "2024-05-01T11:00:00Z"});
        items.push(o);
    }
    let r = resources(items);
    let copies = r
        .observations
        .iter()
        .filter(|o| o.id.as_deref() == Some("d"))
        .count();
    assert_eq!(copies, 10, "ten distinct values, each kept once");
    let assessed = assess(&r, now(), Some("p1"), &News2Settings::default());
    assert!(
        !matches!(assessed, Assessment::Scored(_)),
        "conflicting copies are not scored"
    );
    // distinct copies past the cap: kept up to it, the rest unreadable
    let mut items = vec![patient("1950-01-01")];
    items.extend(vitals());
    for k in 0..2_000 {
        let mut o = q("59408-5", 50.0 + k as f64 * 0.01, "%");
        o["id"] = json!("d");
        o["meta"] = json!({"lastUpdated": "2024-05-01T11:00:00Z"});
        items.push(o);
    }
    let r = resources(items);
    assert_eq!(
        r.observations
            .iter()
            .filter(|o| o.id.as_deref() == Some("d"))
            .count(),
        MAX_COPIES
    );
    assert_eq!(r.unreadable.len(), 2_000 - MAX_COPIES);
    let assessed = assess(&r, now(), Some("p1"), &News2Settings::default());
    assert!(!matches!(assessed, Assessment::Scored(_)), "{assessed:?}");
}

/// *Breathing room air* or *Patient on oxygen* answered yes or no (`valueBoolean`, or a
/// Yes/No concept): a "no" says the other. A room-air observation answered false or "No"
/// was scored as air from its code alone, 2 points under the chart (a red-team finding).
/// Any other answer (a string, a concept that is neither) makes the parameter unusable.
#[test]
fn a_yes_or_no_answer_to_room_air_or_oxygen_is_read() {
    let with_supply = |supply: Value| {
        let mut items = vec![patient("1950-01-01")];
        let mut v = vitals();
        v[2] = supply;
        items.extend(v);
        run(items, &News2Settings::default())
    };
    let scored = |a: Assessment| match a {
        Assessment::Scored(s) => s.score.sub_score(Parameter::AirOrOxygen),
        other => panic!("not scored: {other:?}"),
    };
    let answered = |code: &str, answer: Value| {
        let mut o = coded(SNOMED, code, None);
        o.as_object_mut()
            .unwrap()
            .extend(answer.as_object().unwrap().clone());
        o
    };
    let yes_no = |system: &str, code: &str| json!({"valueCodeableConcept": {"coding": [{"system": system, "code": code}]}});
    // Room air: true (or Yes) is air, false (or No) oxygen.
    for (answer, oxygen) in [
        (json!({"valueBoolean": true}), false),
        (json!({"valueBoolean": false}), true),
        (yes_no(SNOMED, "373066001"), false),
        (yes_no(SNOMED, "373067005"), true),
        (yes_no(LOINC, "LA33-6"), false),
        (yes_no(LOINC, "LA32-8"), true),
    ] {
        let got = scored(with_supply(answered("722742002", answer.clone())));
        assert_eq!(got, if oxygen { 2 } else { 0 }, "room air {answer}");
        // On oxygen: the reverse.
        let got = scored(with_supply(answered("371825009", answer.clone())));
        assert_eq!(got, if oxygen { 0 } else { 2 }, "on oxygen {answer}");
    }
    // Answers that cannot be read: unusable, never air.
    for answer in [
        json!({"valueString": "No"}),
        json!({"valueInteger": 0}),
        json!({"valueQuantity": {"value": 2.0, "unit": "L/min", "system": UCUM, "code": "L/min"}}),
        json!({"valueBoolean": "false"}),
        yes_no(SNOMED, "260385009"), // Negative (not a yes/no answer of this list)
        json!({"valueBoolean": true,
               "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "373067005"}]}}),
    ] {
        let Assessment::Incomplete(i) = with_supply(answered("722742002", answer.clone())) else {
            panic!("scored with an unreadable answer {answer}")
        };
        assert_eq!(i.unusable.len(), 1, "{answer}");
        assert_eq!(i.unusable[0].parameter, Parameter::AirOrOxygen, "{answer}");
        assert_eq!(
            i.unusable[0].reason,
            UnusableReason::UnknownAnswer,
            "{answer}"
        );
    }
}

/// A parameter's value is the newest of any of its codes: the more specific LOINC codes
/// device feeds send alone (heart rate by pulse oximetry 8889-8, oral temperature 8331-1,
/// systolic sitting 8459-0, SpO2 in blood 20564-1) were skipped, and a ten-hour-old value of
/// the profile's code scored, the card silent about the newer reading (a red-team finding).
#[test]
fn a_newer_value_under_a_more_specific_code_is_the_value() {
    let at = |mut o: Value, time: &str| {
        o["effectiveDateTime"] = json!(time);
        o
    };
    let old = "2024-05-01T02:00:00Z";
    let new = "2024-05-01T11:55:00Z";
    // RR 16, SpO2 97, air, SBP 120, pulse 70, alert, 37.0: 0, ten hours old.
    let baseline = || {
        vec![
            patient("1950-01-01"),
            at(q("9279-1", 16.0, "/min"), old),
            at(q("59408-5", 97.0, "%"), old),
            at(coded(SNOMED, "722742002", None), old),
            at(q("8480-6", 120.0, "mm[Hg]"), old),
            at(q("8867-4", 70.0, "/min"), old),
            at(coded(LOINC, "67775-7", Some((SNOMED, "248234008"))), old),
            at(q("8310-5", 37.0, "Cel"), old),
        ]
    };
    let settings = News2Settings {
        vitals: nightingale_decision_support::vitals::VitalsOptions {
            look_back: chrono::Duration::hours(24),
            ..Default::default()
        },
        ..Default::default()
    };
    let Assessment::Scored(s) = run(baseline(), &settings) else {
        panic!("baseline not scored")
    };
    assert_eq!(s.score.total, 0);
    for (newer, parameter, points) in [
        (q("8889-8", 140.0, "/min"), Parameter::PulseRate, 3),
        (q("8893-0", 140.0, "/min"), Parameter::PulseRate, 3),
        (q("8331-1", 39.6, "Cel"), Parameter::Temperature, 2),
        (q("8332-9", 39.6, "Cel"), Parameter::Temperature, 2),
        (q("8333-7", 39.6, "Cel"), Parameter::Temperature, 2),
        (q("8328-7", 39.6, "Cel"), Parameter::Temperature, 2),
        (q("8329-5", 39.6, "Cel"), Parameter::Temperature, 2),
        (
            q("8459-0", 85.0, "mm[Hg]"),
            Parameter::SystolicBloodPressure,
            3,
        ),
        (
            q("8460-8", 85.0, "mm[Hg]"),
            Parameter::SystolicBloodPressure,
            3,
        ),
        (
            q("8461-6", 85.0, "mm[Hg]"),
            Parameter::SystolicBloodPressure,
            3,
        ),
        (
            q("76534-7", 85.0, "mm[Hg]"),
            Parameter::SystolicBloodPressure,
            3,
        ),
        (q("20564-1", 85.0, "%"), Parameter::OxygenSaturation, 3),
        (q("2710-2", 85.0, "%"), Parameter::OxygenSaturation, 3),
    ] {
        let code = newer["code"]["coding"][0]["code"].clone();
        let mut items = baseline();
        items.push(at(newer, new));
        let Assessment::Scored(s) = run(items, &settings) else {
            panic!("{code}: not scored")
        };
        assert_eq!(s.score.sub_score(parameter), points, "{code}");
        assert_eq!(s.score.total, points, "{code}");
        assert_eq!(
            s.vitals.time(parameter),
            Some(new.parse().unwrap()),
            "{code}"
        );
    }
}
