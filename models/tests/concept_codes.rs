//! The SNOMED CT identifier check, held to the identifiers pydicom's code dictionary lists
//! (fixtures/codes, written by models/train/make_code_fixtures.py).

use nightingale_models::check_sctid;

fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/codes")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn listed() -> Vec<String> {
    let ids: Vec<String> = fixture("sctids.txt").lines().map(str::to_owned).collect();
    assert!(ids.len() > 1000, "{} identifiers", ids.len());
    ids
}

#[test]
fn every_listed_concept_identifier_passes() {
    for id in listed() {
        assert_eq!(check_sctid(&id), Ok(()), "{id}");
    }
}

#[test]
fn a_mistyped_digit_or_swapped_neighbours_are_refused() {
    // Verhoeff's code detects every single-digit error and every transposition of adjacent
    // digits: every such variant of every listed identifier must be refused.
    let mut variants = 0;
    for id in listed() {
        let digits = id.as_bytes();
        for at in 0..digits.len() {
            for d in b'0'..=b'9' {
                if d == digits[at] {
                    continue;
                }
                let mut v = digits.to_vec();
                v[at] = d;
                let v = String::from_utf8(v).unwrap();
                assert!(check_sctid(&v).is_err(), "{id} -> {v}");
                variants += 1;
            }
            if at + 1 < digits.len() && digits[at] != digits[at + 1] {
                let mut v = digits.to_vec();
                v.swap(at, at + 1);
                let v = String::from_utf8(v).unwrap();
                assert!(check_sctid(&v).is_err(), "{id} -> {v}");
                variants += 1;
            }
        }
    }
    assert!(variants > 50_000, "{variants}");
}

#[test]
fn a_wrong_identifier_in_the_dictionary_is_refused() {
    for line in fixture("not-sctids.txt").lines() {
        let id = line.split_whitespace().next().unwrap();
        assert_eq!(
            check_sctid(id),
            Err("its check digit is wrong (a typing error?)"),
            "{line}"
        );
    }
}

#[test]
fn a_description_or_relationship_identifier_is_refused() {
    // Items 123456 in each partition: of the ten last digits exactly one makes the check
    // digit right; only the concept partitions (00, 10) then pass.
    for (partition, concept) in [
        ("00", true),
        ("10", true),
        ("01", false),
        ("11", false),
        ("02", false),
        ("12", false),
    ] {
        let results: Vec<_> = (0..10)
            .map(|d| check_sctid(&format!("123456{partition}{d}")))
            .collect();
        let right_digit: Vec<_> = results
            .iter()
            .filter(|r| **r != Err("its check digit is wrong (a typing error?)"))
            .collect();
        assert_eq!(right_digit.len(), 1, "{partition}: {results:?}");
        assert_eq!(right_digit[0].is_ok(), concept, "{partition}: {results:?}");
    }
    for bad in ["", "12345", "0279250040", "1234567890123456789", "2792500x"] {
        assert!(check_sctid(bad).is_err(), "{bad}");
    }
}
