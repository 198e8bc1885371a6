//! Nightingale: a clinical AI inference server.
//!
//! This package holds the binary's pieces that tests drive directly: the typed
//! configuration ([`config`]), the audit trail ([`audit`]) and the HTTP layer ([`http::app`]).

pub mod audit;
pub mod config;
pub mod deploy;
pub mod http;
pub mod tls;
