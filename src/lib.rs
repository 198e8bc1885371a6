//! Nightingale: a clinical AI inference server.
//!
//! This package holds the binary's pieces that tests drive directly: the typed
//! configuration ([`config`]), the audit trail ([`audit`]) and the HTTP layer ([`http::app`]).

pub mod audit;
pub mod cds;
pub mod cds_imaging;
pub mod cds_store;
pub mod config;
pub mod deploy;
pub mod files;
pub mod heatmap;
pub mod http;
/// In the DICOM crate, whose SCP uses it too; the HTTP and TLS layers' as well.
pub use nightingale_dicom::log_limit;
pub mod log_line;
// ---- issue 9: the DICOM pipeline (series → models → results to PACS) ----
pub mod pipeline;
pub mod tls;
pub mod validate;

/// The probe every load of this binary goes through ([`nightingale_models::ProbeCommand`]):
/// this program (`/proc/self/exe`, so a binary replaced on disk by an upgrade is not the one
/// run) with `__probe-model`.
pub fn probe_command() -> Option<nightingale_models::ProbeCommand> {
    let program = std::path::PathBuf::from("/proc/self/exe");
    let program = if program.exists() {
        program
    } else {
        std::env::current_exe().ok()?
    };
    Some(nightingale_models::ProbeCommand {
        program,
        args: vec!["__probe-model".to_owned()],
    })
}
