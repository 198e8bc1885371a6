//! nightingale-decision-support (crate documentation written in a later commit).

pub mod fhir;
pub mod news2;
pub mod vitals;
