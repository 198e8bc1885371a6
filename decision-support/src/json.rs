//! JSON whose objects name a key twice is refused.
//!
//! RFC 8259 §4 leaves the meaning of a repeated key to the reader, and readers differ:
//! serde_json keeps the last value, other parsers keep the first. A hook request whose
//! Observation says `"status": "entered-in-error", "status": "final"` was scored by
//! Nightingale (the last wins) where a gateway, an audit copy or a validator that keeps the
//! first sees a retracted reading (a review's finding). FHIR's JSON format forbids repeated
//! properties, and CDS Hooks bodies are JSON of known shape: so a body with one is refused
//! whole, before anything acts on it. [`check`] walks the text once with serde_json's own
//! parser (its recursion limit included) and keeps only each object's keys while it is
//! read.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Why a text was refused by [`check`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// An object names one key twice (the key when it is a plain name of at most 64
    /// letters, digits, `_`, `-` and `.`: a key may be data).
    #[error("a JSON object names the key {} twice", shown(.key))]
    DuplicateKey { key: Option<String> },
    /// Not JSON, or nested deeper than serde_json's recursion limit: the caller's own
    /// parse says where.
    #[error("not valid JSON")]
    Malformed,
}

fn shown(key: &Option<String>) -> String {
    key.as_deref()
        .map_or_else(|| "(not shown)".to_owned(), |k| format!("`{k}`"))
}

/// Refuses `bytes` when an object in it names a key twice; `Ok` for any other valid JSON.
pub fn check(bytes: &[u8]) -> Result<(), JsonError> {
    let repeated = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let result = Unique {
        repeated: &repeated,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match (result, repeated.into_inner()) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(key)) => {
            let plain = !key.is_empty()
                && key.len() <= 64
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            Err(JsonError::DuplicateKey {
                key: plain.then_some(key),
            })
        }
        (Err(_), None) => Err(JsonError::Malformed),
    }
}

/// Any JSON value, each object's keys checked; the first key named twice is kept in
/// `repeated` (the walk then stops with an error).
#[derive(Clone, Copy)]
struct Unique<'a> {
    repeated: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for Unique<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                *self.repeated.borrow_mut() = Some(key);
                return Err(de::Error::custom("a key named twice"));
            }
            map.next_value_seed(self)?;
            seen.insert(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_refused_at_any_depth() {
        let twice = br#"{"context": {"o": [{"status": "entered-in-error", "status": "final"}]}}"#;
        assert_eq!(
            check(twice),
            Err(JsonError::DuplicateKey {
                key: Some("status".into())
            })
        );
        // Escapes are read: "st\u0061tus" is "status".
        assert!(matches!(
            check(br#"{"status": 1, "st\u0061tus": 2}"#),
            Err(JsonError::DuplicateKey { .. })
        ));
        // A key that may be data is not shown.
        let err = check(br#"{"Smith, John": 1, "Smith, John": 2}"#).unwrap_err();
        assert_eq!(err, JsonError::DuplicateKey { key: None });
        assert!(!err.to_string().contains("Smith"));
    }

    #[test]
    fn valid_json_without_repeats_passes() {
        for text in [
            &br#"{"a": 1, "b": {"a": 1}, "c": [{"a": 1}, {"a": 2}]}"#[..],
            b"[]",
            b"null",
            b"\"x\"",
            b"-1.5e300",
            br#"{"a": 18446744073709551615, "b": -9223372036854775808}"#,
        ] {
            assert_eq!(check(text), Ok(()), "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn not_json_and_deep_nesting_are_malformed() {
        for text in [&b"{\"a\": 1"[..], b"{} {}", b"", b"\xff"] {
            assert_eq!(check(text), Err(JsonError::Malformed));
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(check(deep.as_bytes()), Err(JsonError::Malformed));
    }
}
