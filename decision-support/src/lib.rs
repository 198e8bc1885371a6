//! nightingale-decision-support (crate documentation written in a later commit).

pub mod cards;
pub mod fhir;
pub mod hooks;
pub mod jwt;
pub mod news2;
pub mod service;
pub mod vitals;
