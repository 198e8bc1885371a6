//! Hostile input: arbitrary bytes and arbitrary FHIR-shaped JSON never panic, and what comes
//! out stays within its bounds.

use chrono::{DateTime, Utc};
use nightingale_decision_support::fhir::{Limits, Resource, Resources};
use nightingale_decision_support::hooks::{MAX_SUMMARY_CHARS, truncate_summary};
use nightingale_decision_support::jwt::{JwtOptions, Verifier};
use nightingale_decision_support::news2::{Assessment, News2Settings, assess};
use proptest::prelude::*;
use serde_json::{Value, json};

fn now() -> DateTime<Utc> {
    "2024-05-01T12:00:00Z".parse().unwrap()
}

/// JSON values with the shape of FHIR resources: a known or unknown resourceType and fields
/// of the names this crate reads, holding values of any JSON type.
fn fhir_like() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[ -~]{0,12}".prop_map(Value::from),
        Just(json!("2024-05-01T11:00:00Z")),
        Just(json!("final")),
        Just(json!({"coding": [{"system": "http://loinc.org", "code": "9279-1"}]})),
        Just(json!({"value": 18, "system": "http://unitsofmeasure.org", "code": "/min"})),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("code".to_owned()),
                    Just("value".to_owned()),
                    Just("coding".to_owned()),
                    Just("system".to_owned()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let field = prop_oneof![
        Just("status"),
        Just("code"),
        Just("valueQuantity"),
        Just("valueCodeableConcept"),
        Just("effectiveDateTime"),
        Just("effectivePeriod"),
        Just("component"),
        Just("subject"),
        Just("birthDate"),
        Just("gender"),
        Just("identifier"),
        Just("clinicalStatus"),
        Just("entry"),
        Just("other"),
    ];
    let kind = prop_oneof![
        Just("Patient"),
        Just("Observation"),
        Just("Condition"),
        Just("Bundle"),
        Just("Encounter"),
    ];
    (kind, prop::collection::vec((field, value), 0..8)).prop_map(|(kind, fields)| {
        let mut m = serde_json::Map::new();
        m.insert("resourceType".into(), json!(kind));
        for (f, v) in fields {
            m.insert(f.into(), v);
        }
        Value::Object(m)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Resource::from_json(&bytes, &Limits::default());
    }

    #[test]
    fn fhir_shaped_json_never_panics(resources in prop::collection::vec(fhir_like(), 0..6)) {
        let bundle = json!({"resourceType": "Bundle",
            "entry": resources.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()});
        if let Ok(r) = Resource::from_value(&bundle, &Limits::default()) {
            let all = Resources::from(r);
            match assess(&all, now(), Some("p1"), &News2Settings::default()) {
                Assessment::Scored(s) => prop_assert!(s.score.total <= 20),
                Assessment::Incomplete(_) | Assessment::NotApplicable(_) => {}
            }
        }
    }

    #[test]
    fn summaries_stay_under_140_characters(s in ".{0,400}") {
        let t = truncate_summary(&s);
        prop_assert!(t.chars().count() <= MAX_SUMMARY_CHARS);
    }

    #[test]
    fn arbitrary_tokens_are_refused_without_panicking(token in "[A-Za-z0-9_.=-]{0,300}") {
        let v = Verifier::new(JwtOptions::default());
        prop_assert!(v.verify(&token, "http://x/cds-services/a", 1_700_000_000).is_err());
    }
}
