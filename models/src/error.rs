use std::path::PathBuf;

use nightingale_inference::InferenceError;

use crate::manifest::InvalidManifest;
use crate::selftest::SelfTestError;

/// Why a bundle cannot be served. Each names the file at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    #[error("{path}: invalid bundle manifest: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: InvalidManifest,
    },
    #[error("{path}: manifest is larger than {limit} bytes")]
    ManifestTooLarge { path: PathBuf, limit: u64 },
    #[error("{path}: the manifest names the model {declared:?} but its folder is {folder:?}")]
    NameMismatch {
        path: PathBuf,
        declared: String,
        folder: String,
    },
    #[error(
        "checksum mismatch for {path}: bundle.toml says sha256 {expected}, the file has {actual}"
    )]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "{path} is not listed in bundle.toml (every file of a version folder must be checksummed)"
    )]
    UnlistedFile { path: PathBuf },
    #[error("{path} is larger than {limit} bytes, the most a bundle's file may hold")]
    FileTooLarge { path: PathBuf, limit: u64 },
    #[error("{path}: folders nested deeper than {limit} levels in a version folder")]
    TooDeep { path: PathBuf, limit: usize },
    #[error("{path} is listed in bundle.toml but missing (or not a regular file)")]
    MissingFile { path: PathBuf },
    #[error(
        "{path} is not a regular file (a symbolic link, folder, FIFO or device is refused: the bundle's own files must be in its folder)"
    )]
    NotRegularFile { path: PathBuf },
    #[error(
        "{path} is a symbolic link: a bundle the repository serves must be a folder in it (a link could point anywhere on the server)"
    )]
    BundleLinked { path: PathBuf },
    #[error(
        "{path}: serving {versions} version(s) of {instances} instance(s) would run {asked} engine threads, and the repository's other models run {others}: more than the limit of {limit} (max_engine_threads)"
    )]
    EngineThreads {
        path: PathBuf,
        versions: usize,
        instances: usize,
        asked: usize,
        others: usize,
        limit: usize,
    },
    #[error(
        "{path}: version {version} is not a folder of its own (a symbolic link or file is refused: a version's files must be in the bundle's folder)"
    )]
    VersionNotAFolder { path: PathBuf, version: u64 },
    #[error("{path}: version folder {version} is not listed under [versions] in bundle.toml")]
    UnlistedVersion { path: PathBuf, version: String },
    #[error("{path}: no version selected by the version policy is present")]
    NoVersions { path: PathBuf },
    #[error("{path}: no such version folder")]
    MissingVersion { path: PathBuf },
    #[error("{path}: {}", chain(source))]
    Inference {
        path: PathBuf,
        #[source]
        source: InferenceError,
    },
    #[error("{path}: the {engine} engine panicked while {stage}: {message}")]
    Panicked {
        path: PathBuf,
        engine: &'static str,
        stage: &'static str,
        message: String,
    },
    /// Loading the model stopped the process that tried it ([`crate::ProbeCommand`]).
    #[error(
        "{path}: loading it on {engine} stopped a probe process ({message}); refused, as it would have stopped the server"
    )]
    Crashed {
        path: PathBuf,
        engine: &'static str,
        message: String,
    },
    #[error("{path}: refused: {reason}")]
    OlderRelease { path: PathBuf, reason: String },
    /// The release ledger could not record the release about to serve: nothing changed.
    #[error("{path}: not loaded: {reason}")]
    ReleaseLedger { path: PathBuf, reason: String },
    #[error("{path}: version {version} refused by the deployment policy: {reason}")]
    NotPromoted {
        path: PathBuf,
        version: u64,
        reason: String,
        /// The policy's evidence as it was read for this refusal (see `PromotionCheck`).
        evidence: Option<[u8; 32]>,
    },
    #[error("{path}: refused, self-test failed on {engine}: {source}")]
    SelfTest {
        path: PathBuf,
        engine: &'static str,
        #[source]
        source: Box<SelfTestError>,
    },
    #[error(
        "{path}: refused, the bundle is not signed and signatures are required (sign it with `nightingale models sign --key`)"
    )]
    SignatureMissing { path: PathBuf },
    #[error("{path}: refused, not a minisign signature: {reason}")]
    SignatureMalformed { path: PathBuf, reason: String },
    #[error(
        "{path}: refused, signed by key {key_id}, which is not a trusted key (add its public key with --trusted-key)"
    )]
    SignatureUntrusted { path: PathBuf, key_id: String },
    #[error(
        "{path}: refused, the signature by key {key_id} does not verify (bundle.toml changed after it was signed, or the signature is corrupt): {reason}"
    )]
    SignatureInvalid {
        path: PathBuf,
        key_id: String,
        reason: String,
    },
}

/// An error and its sources, joined with `: ` (the reason a failed load reports).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

impl BundleError {
    /// The file or folder at fault.
    pub fn path(&self) -> &std::path::Path {
        match self {
            BundleError::Io { path, .. }
            | BundleError::Manifest { path, .. }
            | BundleError::ManifestTooLarge { path, .. }
            | BundleError::NameMismatch { path, .. }
            | BundleError::ChecksumMismatch { path, .. }
            | BundleError::UnlistedFile { path }
            | BundleError::MissingFile { path }
            | BundleError::FileTooLarge { path, .. }
            | BundleError::TooDeep { path, .. }
            | BundleError::NotRegularFile { path }
            | BundleError::BundleLinked { path }
            | BundleError::EngineThreads { path, .. }
            | BundleError::VersionNotAFolder { path, .. }
            | BundleError::UnlistedVersion { path, .. }
            | BundleError::NoVersions { path }
            | BundleError::MissingVersion { path }
            | BundleError::Inference { path, .. }
            | BundleError::Panicked { path, .. }
            | BundleError::Crashed { path, .. }
            | BundleError::SelfTest { path, .. }
            | BundleError::NotPromoted { path, .. }
            | BundleError::OlderRelease { path, .. }
            | BundleError::ReleaseLedger { path, .. }
            | BundleError::SignatureMissing { path }
            | BundleError::SignatureMalformed { path, .. }
            | BundleError::SignatureUntrusted { path, .. }
            | BundleError::SignatureInvalid { path, .. } => path,
        }
    }

    /// The same error naming its file relative to `root` (the repository), for answers that
    /// must not show where the server keeps its files. Logs keep the full path.
    pub fn relative_to(mut self, root: &std::path::Path) -> Self {
        let relative = self.path().strip_prefix(root).ok().map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_owned()
            }
        });
        if let Some(relative) = relative {
            match &mut self {
                BundleError::Io { path, .. }
                | BundleError::Manifest { path, .. }
                | BundleError::ManifestTooLarge { path, .. }
                | BundleError::NameMismatch { path, .. }
                | BundleError::ChecksumMismatch { path, .. }
                | BundleError::UnlistedFile { path }
                | BundleError::MissingFile { path }
                | BundleError::FileTooLarge { path, .. }
                | BundleError::TooDeep { path, .. }
                | BundleError::NotRegularFile { path }
                | BundleError::BundleLinked { path }
                | BundleError::EngineThreads { path, .. }
                | BundleError::VersionNotAFolder { path, .. }
                | BundleError::UnlistedVersion { path, .. }
                | BundleError::NoVersions { path }
                | BundleError::MissingVersion { path }
                | BundleError::Inference { path, .. }
                | BundleError::Panicked { path, .. }
                | BundleError::Crashed { path, .. }
                | BundleError::SelfTest { path, .. }
                | BundleError::NotPromoted { path, .. }
                | BundleError::OlderRelease { path, .. }
                | BundleError::ReleaseLedger { path, .. }
                | BundleError::SignatureMissing { path }
                | BundleError::SignatureMalformed { path, .. }
                | BundleError::SignatureUntrusted { path, .. }
                | BundleError::SignatureInvalid { path, .. } => *path = relative,
            }
        }
        self
    }

    /// The version the error is about, when it is about one version folder.
    pub(crate) fn version(&self) -> Option<u64> {
        match self {
            BundleError::VersionNotAFolder { version, .. }
            | BundleError::NotPromoted { version, .. } => Some(*version),
            _ => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BundleError::Io {
            path: path.into(),
            source: std::sync::Arc::new(source),
        }
    }
}

/// Errors from the repository as a whole.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RepositoryError {
    #[error("unknown model {name:?}")]
    UnknownModel { name: String },
    #[error("model {name:?} has no version {version:?} being served")]
    UnknownVersion { name: String, version: String },
    #[error("model {name:?} is not ready: {reason}")]
    NotReady { name: String, reason: String },
    #[error("model name {name:?} is not valid")]
    InvalidName { name: String },
    /// A [`LoadTarget::PolicyUnlessPinned`](crate::LoadTarget::PolicyUnlessPinned) load found
    /// the model pinned by a rollback (checked under the load lock): nothing was loaded.
    #[error(
        "model {name:?} is pinned to version {version} by a rollback until the next plain load"
    )]
    Pinned { name: String, version: u64 },
    /// A [`LoadTarget::PolicyUnlessPinned`](crate::LoadTarget::PolicyUnlessPinned) load found
    /// the model unloaded by model control: it stays unloaded until a plain load.
    #[error(
        "model {name:?} was unloaded by model control and stays unloaded until a load asks for it"
    )]
    Held { name: String },
    /// The caller's commit step (e.g. writing the load's audit record) refused the versions
    /// just before they would have started serving: nothing changed.
    #[error("model {name:?} was not swapped in: {reason}")]
    CommitRefused { name: String, reason: String },
    #[error("cannot read the model repository {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

impl RepositoryError {
    /// Whether the load failed for a reason of the moment, not for what the bundle holds:
    /// the release ledger could not be read or written (a full disk, a volume remounted
    /// read-only). The repository poller tries such a load again.
    pub fn is_of_the_moment(&self) -> bool {
        matches!(
            self,
            RepositoryError::Bundle(BundleError::ReleaseLedger { .. })
        )
    }
}
