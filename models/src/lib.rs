//! Model bundles for Nightingale: the `bundle.toml` manifest, SHA-256 verification, and a
//! Triton-style repository that loads, versions, swaps and unloads models at run time.
//!
//! ```text
//! <repository>/
//!   wdbc-malignancy/
//!     bundle.toml        name, task, inputs/outputs, thresholds, intended use, provenance,
//!                        batching, version policy, and the SHA-256 of every version file
//!     bundle.toml.minisig  minisign (Ed25519) signature over bundle.toml's bytes
//!     MODEL_CARD.md
//!     1/model.onnx
//!     2/model.onnx
//! ```

mod checksum;
mod error;
pub mod init;
pub mod manifest;
pub mod preprocess;
pub mod releases;
mod repository;
pub mod selftest;
pub mod signature;

pub use checksum::{
    FILE_LIMIT, open_lock_file, read_verified, sha256_file, sha256_reader, verify_folder,
};
pub use error::{BundleError, RepositoryError};
pub use init::{InitError, InitOptions, InitReport, init};
pub use manifest::{ConceptCode, Manifest, SelfTestSpec, TaskKind, Tolerance, check_sctid};
pub use preprocess::{
    Image, InputGeometry, PreprocessError, Preprocessing, VolumeInput, VolumeValues,
};
pub use repository::{
    Bundle, DEFAULT_MAX_ENGINE_THREADS, IndexEntry, LoadOutcome, LoadTarget, LoadedModel,
    MANIFEST_FILE, ModelState, PROBE_TIMEOUT, ProbeCommand, PromotionCheck, Repository,
    RepositoryOptions, probe_load,
};
pub use selftest::{SelfTestError, SelfTestReport};
pub use signature::{SignaturePolicy, SignatureStatus, SigningKey, TrustedKey};

/// Writes `bytes` to `path` (in the folder `dir`) atomically and without following any link a
/// third party may have planted in `dir`: the bytes go to a new file created exclusively
/// (`O_EXCL`, so never through an existing name or link) under an unpredictable name in `dir`
/// with the permission bits `mode` (less the umask), are flushed to disk, then renamed over
/// `path` (a rename replaces a link at `path`, it does not write through it), and the folder
/// is flushed. The temporary file is removed on error, which names the path it happened at.
pub(crate) fn write_atomic(
    dir: &std::path::Path,
    path: &std::path::Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), (std::path::PathBuf, std::io::Error)> {
    use std::io::Write as _;
    let prefix = format!(
        ".{}.",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .tempfile_in(dir)
        .map_err(|e| (dir.to_owned(), e))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| (tmp.path().to_owned(), e))?;
    tmp.persist(path).map_err(|e| (path.to_owned(), e.error))?;
    // The rename is durable once the folder is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| (dir.to_owned(), e))
}
