//! nightingale-decision-support (crate documentation written in a later commit).

pub mod fhir;
pub mod vitals;
