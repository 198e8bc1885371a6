//! nightingale-dicom: DICOM ingest for Nightingale.
//!
//! - [`spool`]: the durable spool of received instances (Part 10 files + an SQLite index);
//!   its [`Spool::store`] is the one entry point for every ingest path (DIMSE now,
//!   STOW-RS).
//! - [`multipart`], [`stow`]: STOW-RS bodies, part by part into the spool; [`qido`]: QIDO-RS
//!   queries over the spool's index.
//! - [`scp`]: the DIMSE SCP (C-ECHO, C-STORE) on tokio.
//! - [`events`]: what the SCP reports for the audit trail.
//! - [`maintenance`]: `check` (index ↔ files) and `purge` (retention) of the spool.
//! - [`scu`]: a C-ECHO/C-STORE client (the operator CLI, and results sent back to PACS).
//! - [`results`]: AI results as DICOM (TID 1500 SR, secondary capture with burned-in text).
//! - [`sop`]: the storage SOP classes and transfer syntaxes accepted by default.
//! - [`pixels`]: pixel decode (Modality/VOI LUT, MONOCHROME1, colour) into `f32` frames for
//!   the preprocessing, an 8-bit rendering, and a budget of pixels decoded at once.
//! - [`unknown_vr`]: standard attributes an archive wrote as UN, read with their dictionary's
//!   VR by everything that reads stored objects.
//! - [`volume`]: a series as one volume: slice geometry, order, and the series that cannot be
//!   one.

pub mod attributes;
pub mod events;
pub mod log_limit;
pub mod maintenance;
pub mod meta;
pub mod multipart;
// Pixel decode (issue 9, PIXELS slice)
pub mod pixels;
pub mod qido;
// DICOM results (issue 9, RESULTS slice)
pub mod results;
pub mod scp;
pub mod scu;
// ---- issue 9, coordinator: series over the spool for the pipeline ----
pub mod reencode;
pub mod series;
pub mod sop;
pub mod spool;
pub mod sqlite_schema;
pub mod stow;
pub mod structure;
mod ul;
pub mod unknown_vr;
pub mod volume;

pub use attributes::Attributes;
pub use events::{DicomEvent, EventSink, InstanceEvent};
pub use scp::{AllowedAe, Scp, ScpConfig, ScpError};
pub use spool::{Incoming, Recovery, Spool, SpoolError, SpoolOptions, StoreError, Stored};
