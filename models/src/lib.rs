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

pub use checksum::{FILE_LIMIT, read_verified, sha256_file, verify_folder};
pub use error::{BundleError, RepositoryError};
pub use init::{InitError, InitOptions, InitReport, init};
pub use manifest::{ConceptCode, Manifest, SelfTestSpec, TaskKind, Tolerance, check_sctid};
pub use preprocess::{
    Image, InputGeometry, PreprocessError, Preprocessing, VolumeInput, VolumeValues,
};
pub use repository::{
    Bundle, IndexEntry, LoadOutcome, LoadTarget, LoadedModel, MANIFEST_FILE, ModelState,
    PromotionCheck, Repository, RepositoryOptions,
};
pub use selftest::{SelfTestError, SelfTestReport};
pub use signature::{SignaturePolicy, SignatureStatus, SigningKey, TrustedKey};
