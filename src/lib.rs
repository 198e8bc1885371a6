//! Nightingale: a clinical AI inference server.
//!
//! This package holds the binary's pieces that tests drive directly: the typed
//! configuration ([`config`]) and the HTTP layer ([`http::app`]).

pub mod config;
pub mod http;
