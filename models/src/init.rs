//! `nightingale models init`: scaffold a bundle around an ONNX file, the way Triton
//! auto-completes a model configuration.
//!
//! The model is loaded with the serving engine; the bundle declares its inputs and outputs
//! *as that engine runs them* (names, datatypes, shapes; symbolic and unknown dimensions as
//! `-1`). Where the file declares something else (a wrong or missing output shape, ZipMap's
//! sequence of maps served dense), a [`Disagreement`] says so and what runs is written.
//! Every file of version 1 is checksummed; with sample rows (a CSV with a header naming the
//! features) the bundle gets a self-test whose reference outputs come from the same engine
//! (marked as such in `selftest.json`: regenerate them with `models/train/selftest.py
//! --reuse-inputs` for onnxruntime's independent reference). The intended-use and
//! provenance fields are written as `TODO: …` placeholders, which `models check` reports
//! until they are filled ([`Manifest::unfilled_fields`]).
//!
//! Nothing is half-written: the bundle is assembled in a hidden folder of the repository,
//! checked as `models check` would (checksums, load, warm-up, self-test), then renamed into
//! place. An existing bundle folder is never overwritten.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use nightingale_inference::{
    Backend, DataType, DeclaredModel, InferenceError, LoadOptions, ModelMetadata, NamedTensor,
    Tensor, TensorSpec,
};
use serde::Serialize;

use crate::checksum::sha256_file;
use crate::error::BundleError;
use crate::manifest::{Manifest, TaskKind, valid_name};
use crate::repository::{Bundle, MANIFEST_FILE, PROBE_MAX_BYTES, RepositoryOptions, Zeros, zeros};
use crate::selftest::{SELFTEST_FORMAT, SelfTestReport};

/// The prefix that marks a field still to be filled in.
pub const TODO_MARKER: &str = "TODO";
/// Largest model file accepted: protobuf's own limit (larger models need external data
/// files, which bundles do not carry).
pub const MODEL_LIMIT: u64 = 2 << 30;
/// Largest sample CSV, and most rows in it (a self-test is a handful of rows, not a data set).
pub const SAMPLE_LIMIT: u64 = 16 << 20;
pub const SAMPLE_MAX_ROWS: usize = 1000;
/// Default self-test tolerances (those of `models/train/selftest.py`); integer outputs exact.
pub const DEFAULT_ATOL: f64 = 1e-5;
pub const DEFAULT_RTOL: f64 = 1e-4;
const SELFTEST_FILE: &str = "selftest.json";
const MODEL_FILE: &str = "model.onnx";

/// What to scaffold.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// The bundle's name (its folder in the repository).
    pub name: String,
    /// The repository folder (created when missing).
    pub repository: PathBuf,
    /// Sample rows for the self-test and the feature names (CSV with a header).
    pub sample: Option<PathBuf>,
    pub task: TaskKind,
    /// The engine that loads the model (and writes the self-test's outputs).
    pub load: RepositoryOptions,
}

/// Where the file's declaration and the engine disagree about one input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disagreement {
    /// `input` or `output`.
    pub kind: &'static str,
    pub tensor: String,
    /// What the file declares (e.g. `FP32 [batch_size, 5]`, `not a tensor (...)`).
    pub declared: String,
    /// What the engine runs and the bundle declares (e.g. `FP32 [-1, 3]`).
    pub runs: String,
}

impl std::fmt::Display for Disagreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?}: the file declares {}, the engine runs it as {}; the bundle declares what runs",
            self.kind, self.tensor, self.declared, self.runs
        )
    }
}

/// What `init` did.
#[derive(Clone, Debug)]
pub struct InitReport {
    pub bundle_dir: PathBuf,
    pub engine: &'static str,
    /// Who wrote the ONNX file (`producer_name producer_version`).
    pub producer: String,
    pub metadata: ModelMetadata,
    pub disagreements: Vec<Disagreement>,
    /// Other things the user should know (fixed batch, outputs left out of the self-test...).
    pub notes: Vec<String>,
    /// The self-test as the check after writing ran it (`None`: no sample given).
    pub selftest: Option<SelfTestReport>,
    /// Fields written as `TODO: …` placeholders.
    pub unfilled: Vec<&'static str>,
}

/// Why a bundle could not be scaffolded. Nothing is left behind in the repository.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "bundle name {name:?} is not valid: use 1-128 of A-Z a-z 0-9 . _ - (not starting with '.')"
    )]
    InvalidName { name: String },
    #[error(
        "{path} already exists: init never overwrites a bundle (choose another --name, remove it first, or add a version to it with --version N)"
    )]
    Exists { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "{path} is {size} bytes; ONNX files hold at most {limit} (protobuf's limit; bundles do not carry external data)"
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path} is not a valid ONNX model: {}", crate::error::chain(source))]
    NotOnnx {
        path: PathBuf,
        #[source]
        source: Box<InferenceError>,
    },
    #[error(
        "the {engine} engine cannot load {path}: {}{hint}",
        crate::error::chain(source)
    )]
    Load {
        path: PathBuf,
        engine: &'static str,
        hint: &'static str,
        #[source]
        source: Box<InferenceError>,
    },
    #[error("the {engine} engine panicked while {stage} {path}: {message}")]
    Panicked {
        path: PathBuf,
        engine: &'static str,
        stage: &'static str,
        message: String,
    },
    #[error("{path}: {reason}")]
    Sample { path: PathBuf, reason: String },
    #[error("{path} line {line}, column {column:?}: {reason}")]
    SampleCell {
        path: PathBuf,
        line: u64,
        column: String,
        reason: &'static str,
    },
    #[error(
        "running the sample rows on the {engine} engine failed: {}",
        crate::error::chain(source)
    )]
    SampleRun {
        engine: &'static str,
        #[source]
        source: Box<InferenceError>,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the scaffolded bundle does not pass its own check (nothing was written): {source}")]
    Check {
        #[source]
        source: Box<BundleError>,
    },
    #[error(
        "{path} holds no bundle to add a version to (no bundle.toml); without --version, init scaffolds a new bundle"
    )]
    NoBundle { path: PathBuf },
    #[error(
        "version {version} of {name} already exists (in its bundle.toml or as a folder): choose another --version"
    )]
    VersionExists { name: String, version: u64 },
    #[error("version 0 is not a version: versions are numbered from 1")]
    VersionZero,
    #[error(
        "the bundle {path} does not open (nothing was written): {}",
        crate::error::chain(source)
    )]
    Existing {
        path: PathBuf,
        #[source]
        source: Box<BundleError>,
    },
    #[error(
        "the self-test inputs of version {version} ({path}) do not fit the new model: {reason}; give --sample rows.csv"
    )]
    PreviousSelfTest {
        version: u64,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "another `models init --version` is adding a version to {name}: run again once it is done"
    )]
    Busy { name: String },
    #[error("the scaffolded manifest is not valid (nothing was written): {reason}")]
    Manifest { reason: String },
}

/// Scaffolds `<repository>/<name>/` around `model` (see the module docs).
pub fn init(model: &Path, options: &InitOptions) -> Result<InitReport, InitError> {
    if !valid_name(&options.name) {
        return Err(InitError::InvalidName {
            name: options.name.clone(),
        });
    }
    let dest = options.repository.join(&options.name);
    if fs::symlink_metadata(&dest).is_ok() {
        return Err(InitError::Exists { path: dest });
    }
    let Scaffolding {
        bytes,
        declared,
        mut backend,
        metadata,
        disagreements,
        mut notes,
    } = load_model(model, options, 1)?;
    let engine = options.load.backend;
    for input in &metadata.inputs {
        if input.shape.first() == Some(&1) {
            notes.push(format!(
                "input {:?} has a fixed first dimension of 1 ({}): each request carries one row \
                 and requests are not batched; re-export with a dynamic batch axis to batch",
                input.name,
                shape_text(&input.shape)
            ));
        }
    }

    let sample = match &options.sample {
        None => None,
        Some(path) => Some(sample_selftest(
            path,
            backend.as_mut(),
            &metadata,
            &mut notes,
        )?),
    };
    drop(backend);

    fs::create_dir_all(&options.repository).map_err(|source| InitError::Write {
        path: options.repository.clone(),
        source,
    })?;
    let staging = Staging::new(&options.repository, &options.name)?;
    let bundle_dir = staging.dir.join(&options.name);
    let vdir = bundle_dir.join("1");
    fs::create_dir_all(&vdir).map_err(|source| InitError::Write {
        path: vdir.clone(),
        source,
    })?;
    write(&vdir.join(MODEL_FILE), &bytes)?;
    let mut files = vec![MODEL_FILE];
    if let Some(s) = &sample {
        write(&vdir.join(SELFTEST_FILE), s.json.as_bytes())?;
        files.push(SELFTEST_FILE);
    }
    let mut checksums = vec![];
    for f in files {
        let path = vdir.join(f);
        let digest = sha256_file(&path).map_err(|source| InitError::Read { path, source })?;
        checksums.push((f, digest));
    }
    let source_name = model
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = manifest_text(&ManifestParts {
        name: &options.name,
        task: options.task,
        metadata: &metadata,
        declared: &declared,
        source_name: &source_name,
        sample: sample.as_ref(),
        checksums: &checksums,
    });
    let manifest = Manifest::parse(&text).map_err(|e| InitError::Manifest { reason: e.0 })?;
    write(&bundle_dir.join(MANIFEST_FILE), text.as_bytes())?;

    // The same checks as `models check`: checksums, load, declared vs model, warm-up, self-test.
    let bundle = Bundle::open(&bundle_dir).map_err(|source| InitError::Check {
        source: Box::new(source),
    })?;
    let loaded = bundle
        .load_version(1, &options.load)
        .map_err(|source| InitError::Check {
            source: Box::new(source),
        })?;
    let selftest = loaded.selftest.clone();
    drop(loaded);

    staging.commit(&dest)?;
    Ok(InitReport {
        bundle_dir: dest,
        engine: engine.as_str(),
        producer: declared.producer.clone(),
        metadata,
        disagreements,
        notes,
        selftest,
        unfilled: manifest.unfilled_fields(),
    })
}

/// What `add_version` did, beyond what [`InitReport`] says.
#[derive(Debug)]
pub struct AddedVersion {
    pub report: InitReport,
    pub version: u64,
    /// The version whose self-test inputs were run through the new model (no `--sample`).
    pub selftest_from: Option<u64>,
    /// The manifest's `release`, raised by one (`None`: it declares none).
    pub release: Option<(u64, u64)>,
    /// The bundle carries a signature, which no longer covers the new manifest.
    pub was_signed: bool,
}

/// Adds version `version` (default: one above the highest) of the existing bundle
/// `options.name` around `model`: the version folder with the model and its checksums, a
/// self-test (from `options.sample`, else the newest earlier version's self-test inputs run
/// through the new model on the engine), `[versions.N]` appended to bundle.toml as it is
/// (comments and layout kept) and its `release` raised where it declares one. The bundle with
/// the new version is checked as `models check` would (the manifest, and the new version's
/// load, declared inputs and outputs, warm-up and self-test) in a hidden folder of the
/// repository before anything of the bundle changes; then the version folder is renamed in
/// and bundle.toml replaced in one rename each. The signature is not made again (the key is
/// not here): `was_signed` says the bundle needs `models sign` before a server that checks
/// signatures takes the new manifest.
pub fn add_version(
    model: &Path,
    options: &InitOptions,
    version: Option<u64>,
) -> Result<AddedVersion, InitError> {
    if !valid_name(&options.name) {
        return Err(InitError::InvalidName {
            name: options.name.clone(),
        });
    }
    let dest = options.repository.join(&options.name);
    let manifest_path = dest.join(MANIFEST_FILE);
    if !fs::symlink_metadata(&manifest_path).is_ok_and(|m| m.is_file()) {
        return Err(InitError::NoBundle { path: dest });
    }
    // One version added at a time to a bundle: two at once each replaced bundle.toml with its
    // own copy, and the first one's version was left unlisted, which refused the whole
    // bundle (a review's finding). The lock is a hidden file of the repository (never
    // removed: a removal races with the next holder), held until this returns.
    let lock_path = options
        .repository
        .join(format!(".{}.init.lock", options.name));
    let _lock = crate::checksum::open_lock_file(&lock_path)
        .map_err(|source| InitError::Write {
            path: lock_path.clone(),
            source,
        })
        .and_then(|lock| match lock.try_lock() {
            Ok(()) => Ok(lock),
            Err(fs::TryLockError::WouldBlock) => Err(InitError::Busy {
                name: options.name.clone(),
            }),
            Err(fs::TryLockError::Error(source)) => Err(InitError::Write {
                path: lock_path.clone(),
                source,
            }),
        })?;
    let existing = Bundle::open(&dest).map_err(|source| InitError::Existing {
        path: dest.clone(),
        source: Box::new(source),
    })?;
    let numbers: Vec<u64> = existing
        .manifest
        .versions
        .keys()
        .filter_map(|v| v.parse().ok())
        .collect();
    let version = version.unwrap_or_else(|| numbers.iter().max().map_or(1, |m| m + 1));
    if version == 0 {
        return Err(InitError::VersionZero);
    }
    if numbers.contains(&version) || fs::symlink_metadata(dest.join(version.to_string())).is_ok() {
        return Err(InitError::VersionExists {
            name: options.name.clone(),
            version,
        });
    }
    let Scaffolding {
        bytes,
        declared,
        mut backend,
        metadata,
        disagreements,
        mut notes,
    } = load_model(model, options, version)?;
    let engine = options.load.backend;

    // The self-test: the sample rows given, else the inputs of the newest earlier version's.
    let selftest_name = existing
        .manifest
        .selftest
        .as_ref()
        .map_or(SELFTEST_FILE, |s| s.file.as_str())
        .to_owned();
    let mut selftest_from = None;
    let json = match &options.sample {
        Some(path) => Some(sample_selftest(path, backend.as_mut(), &metadata, &mut notes)?.json),
        None => {
            let previous = numbers
                .iter()
                .filter(|&&n| n < version)
                .max()
                .or(numbers.iter().max())
                .copied();
            match previous {
                Some(p) if dest.join(p.to_string()).join(&selftest_name).is_file() => {
                    let path = dest.join(p.to_string()).join(&selftest_name);
                    selftest_from = Some(p);
                    Some(selftest_from_previous(
                        &path,
                        p,
                        backend.as_mut(),
                        &metadata,
                        &mut notes,
                    )?)
                }
                _ => None,
            }
        }
    };
    drop(backend);

    // The new manifest: bundle.toml as it is, the release raised, the version appended.
    let staging = Staging::new(&options.repository, &options.name)?;
    let bundle_dir = staging.dir.join(&options.name);
    let vdir = bundle_dir.join(version.to_string());
    fs::create_dir_all(&vdir).map_err(|source| InitError::Write {
        path: vdir.clone(),
        source,
    })?;
    if json.is_some() && selftest_name == MODEL_FILE {
        return Err(InitError::Manifest {
            reason: format!(
                "the manifest's [selftest] file is {selftest_name:?}, the name init gives the model: rename the self-test file in [selftest]"
            ),
        });
    }
    write(&vdir.join(MODEL_FILE), &bytes)?;
    let mut files = vec![MODEL_FILE.to_owned()];
    if let Some(json) = &json {
        // The self-test may sit in a folder of the version (`file = "ref/st.json"`).
        let path = vdir.join(&selftest_name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| InitError::Write {
                path: parent.to_owned(),
                source,
            })?;
        }
        write(&path, json.as_bytes())?;
        files.push(selftest_name.clone());
    }
    if json.is_none() && existing.manifest.selftest.is_some() {
        notes.push(format!(
            "version {version} has no self-test (no --sample, and no earlier version has one), while the manifest's [selftest] asks for one: give --sample rows.csv"
        ));
    }
    // The file's own line ends for the lines added (a CRLF manifest stays CRLF).
    let nl = if existing.text.contains("\r\n") {
        "\r\n"
    } else {
        "\n"
    };
    let source_name = model
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut added = format!(
        "{nl}[versions.{version}]{nl}description = {}{nl}model_file = \"{MODEL_FILE}\"{nl}{nl}[versions.{version}.files]{nl}",
        q(&format!(
            "{source_name} as given to nightingale models init --version {version}"
        ))
    );
    for f in &files {
        let path = vdir.join(f);
        let digest = sha256_file(&path).map_err(|source| InitError::Read { path, source })?;
        added.push_str(&format!("{} = {}{nl}", q(f), q(&digest)));
    }
    let with_version = |base: &str| {
        let mut text = base.to_owned();
        if !text.ends_with('\n') {
            text.push_str(nl);
        }
        text.push_str(&added);
        text
    };
    // The release raised where the parsed manifest then says so (a `release = 1` line inside a
    // multi-line string was raised in its place, and the key kept: a review's finding).
    let raised = existing.manifest.release.and_then(|r| {
        raise_release(&existing.text, r)
            .into_iter()
            .find_map(|edited| {
                let text = with_version(&edited);
                let parsed = Manifest::parse(&text).ok()?;
                (parsed.release == Some(r + 1)).then_some((text, parsed, r))
            })
    });
    let (text, manifest, release) = match raised {
        Some((text, parsed, r)) => (text, parsed, Some((r, r + 1))),
        None => {
            if let Some(r) = existing.manifest.release {
                notes.push(format!(
                    "the manifest's release ({r}) was not raised (no top-level `release = {r}` line init can edit): raise it before signing, or servers that served release {r} keep the old manifest"
                ));
            }
            let text = with_version(&existing.text);
            let parsed = Manifest::parse(&text).map_err(|e| InitError::Manifest { reason: e.0 })?;
            (text, parsed, None)
        }
    };
    write(&bundle_dir.join(MANIFEST_FILE), text.as_bytes())?;
    if let crate::manifest::PolicyKind::Specific = manifest.version_policy.policy {
        notes.push(format!(
            "the version policy serves the versions it lists ({:?}): add {version} to them to serve it",
            manifest.version_policy.versions
        ));
    }

    // The check: the manifest, and the new version as a server loads it.
    let bundle = Bundle::open(&bundle_dir).map_err(|source| InitError::Check {
        source: Box::new(source),
    })?;
    let loaded = bundle
        .load_version(version, &options.load)
        .map_err(|source| InitError::Check {
            source: Box::new(source),
        })?;
    let selftest = loaded.selftest.clone();
    drop(loaded);

    // In place: the version folder, then the manifest that lists it (a poller that sees the
    // folder first refuses it as unlisted until the manifest follows, and serves on).
    // bundle.toml as it was read: one edited meanwhile (by hand; another init waits for the
    // lock) is not replaced by a copy without the edit.
    let now = fs::read(&manifest_path).map_err(|source| InitError::Read {
        path: manifest_path.clone(),
        source,
    })?;
    if now != existing.text.as_bytes() {
        return Err(InitError::Manifest {
            reason: format!(
                "{} changed while version {version} was being added: nothing was changed; run init again",
                manifest_path.display()
            ),
        });
    }
    let placed = dest.join(version.to_string());
    fs::rename(&vdir, &placed).map_err(|source| InitError::Write {
        path: placed.clone(),
        source,
    })?;
    let tmp = staging.dir.join(MANIFEST_FILE);
    fs::rename(bundle_dir.join(MANIFEST_FILE), &tmp)
        .and_then(|()| fs::rename(&tmp, &manifest_path))
        .map_err(|source| {
            let _ = fs::remove_dir_all(&placed);
            InitError::Write {
                path: manifest_path.clone(),
                source,
            }
        })?;
    drop(staging);
    let was_signed = dest.join(crate::signature::SIGNATURE_FILE).is_file();
    Ok(AddedVersion {
        report: InitReport {
            bundle_dir: dest,
            engine: engine.as_str(),
            producer: declared.producer.clone(),
            metadata,
            disagreements,
            notes,
            selftest,
            unfilled: manifest.unfilled_fields(),
        },
        version,
        selftest_from,
        release,
        was_signed,
    })
}

/// `text` with the number of a `release = r` line raised to `r + 1`, the rest of the line (a
/// comment, its line end) kept: one text per such line, in order. The caller keeps the first
/// whose parse says the top-level key was raised (a line may stand inside a multi-line
/// string, and a line of that string may look like a table header: the text is not parsed
/// here, a re-attack's finding).
fn raise_release(text: &str, r: u64) -> Vec<String> {
    let want = r.to_string();
    let mut at = 0;
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(rest) = trimmed.strip_prefix("release") {
            let after_key = rest.trim_start();
            if let Some(value) = after_key.strip_prefix('=') {
                let number = value.trim_start();
                let digits = number.len()
                    - number
                        .trim_start_matches(|c: char| c.is_ascii_digit())
                        .len();
                let tail = &number[digits..];
                let ends = tail.trim_start();
                if number[..digits] == want && (ends.is_empty() || ends.starts_with('#')) {
                    let start = at
                        + indent
                        + "release".len()
                        + (rest.len() - after_key.len())
                        + 1
                        + (value.len() - number.len());
                    let mut edited = String::with_capacity(text.len() + 1);
                    edited.push_str(&text[..start]);
                    edited.push_str(&(r + 1).to_string());
                    edited.push_str(&text[start + digits..]);
                    out.push(edited);
                }
            }
        }
        at += line.len();
    }
    out
}

/// `selftest.json` for a new version: the inputs of version `from`'s self-test (`path`),
/// as they are in that file, with the outputs the engine gives for them.
fn selftest_from_previous(
    path: &Path,
    from: u64,
    backend: &mut dyn Backend,
    metadata: &ModelMetadata,
    notes: &mut Vec<String>,
) -> Result<String, InitError> {
    let bytes = read_limited(path, PROBE_MAX_BYTES.min(256 << 20))?;
    let refused = |reason: String| InitError::PreviousSelfTest {
        version: from,
        path: path.to_owned(),
        reason,
    };
    let inputs =
        crate::selftest::reference_inputs(&bytes, metadata).map_err(|e| refused(e.to_string()))?;
    let raw: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| refused(e.to_string()))?;
    let raw_inputs = raw
        .get("inputs")
        .and_then(|v| v.as_array())
        .cloned()
        .ok_or_else(|| refused("no inputs".into()))?;
    let engine = backend.name();
    let outputs = guarded(
        path,
        engine,
        "running the earlier self-test inputs of",
        || {
            backend
                .infer(inputs)
                .map_err(|source| InitError::SampleRun {
                    engine,
                    source: Box::new(source),
                })
        },
    )?;
    let mut json_outputs = vec![];
    for out in outputs {
        match json_data(&out.tensor) {
            Some(data) => json_outputs.push(
                serde_json::to_string(&JsonTensor {
                    name: out.name,
                    datatype: out.tensor.datatype(),
                    shape: out.tensor.shape().to_vec(),
                    data,
                })
                .map_err(|e| refused(e.to_string()))?,
            ),
            None => notes.push(format!(
                "output {:?} ({}) is left out of the self-test: not finite numbers",
                out.name,
                out.tensor.datatype()
            )),
        }
    }
    if json_outputs.is_empty() {
        return Err(refused(
            "no output of the new model can be compared in a self-test (numbers only)".into(),
        ));
    }
    let file = JsonFile {
        format: SELFTEST_FORMAT,
        producer: format!(
            "{engine} via nightingale models init --version {}: the serving engine itself on version {from}'s self-test inputs, NOT an independent reference (regenerate with models/train/selftest.py --reuse-inputs for onnxruntime's)",
            env!("CARGO_PKG_VERSION")
        ),
        script: "nightingale models init --version".into(),
        inputs: raw_inputs
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()
            .map_err(|e| refused(e.to_string()))?,
        outputs: json_outputs,
    };
    selftest_json(&file).map_err(|e| refused(e.to_string()))
}

/// A model file read and loaded on the engine (as `<name>/<version>/model.onnx`), its inputs
/// and outputs as they run, and where the file declares otherwise.
struct Scaffolding {
    bytes: Vec<u8>,
    declared: DeclaredModel,
    backend: Box<dyn Backend>,
    metadata: ModelMetadata,
    disagreements: Vec<Disagreement>,
    notes: Vec<String>,
}

fn load_model(model: &Path, options: &InitOptions, version: u64) -> Result<Scaffolding, InitError> {
    let bytes = read_limited(model, MODEL_LIMIT)?;
    let declared = nightingale_inference::declared_model(&bytes, model).map_err(|source| {
        InitError::NotOnnx {
            path: model.to_owned(),
            source: Box::new(source),
        }
    })?;

    let engine = options.load.backend;
    let load = LoadOptions {
        backend: engine,
        intra_op_threads: options.load.intra_op_threads,
        execution_provider: options.load.execution_provider,
        ort_library: options.load.ort_library.clone(),
        tract_kernels: options.load.tract_kernels,
        gpu_warm_up_rows: 0,
        max_working_bytes: options.load.max_working_bytes,
    };
    let label = Path::new(&options.name)
        .join(version.to_string())
        .join(MODEL_FILE);
    let mut backend = guarded(model, engine.as_str(), "loading", || {
        nightingale_inference::load_bytes(&bytes, &label, &load).map_err(|source| InitError::Load {
            path: model.to_owned(),
            engine: engine.as_str(),
            hint: load_hint(engine),
            source: Box::new(source),
        })
    })?;
    let mut notes = vec![];
    let engine_metadata = backend.metadata().clone();
    let metadata = probe(
        backend.as_mut(),
        &engine_metadata,
        &mut notes,
        model,
        engine.as_str(),
    )?;
    let disagreements = compare(&declared, &metadata);
    Ok(Scaffolding {
        bytes,
        declared,
        backend,
        metadata,
        disagreements,
        notes,
    })
}

fn load_hint(engine: nightingale_inference::BackendKind) -> &'static str {
    use nightingale_inference::BackendKind;
    match engine {
        BackendKind::Tract if BackendKind::Ort.is_compiled() => {
            " (this build also has ONNX Runtime: try --backend ort)"
        }
        BackendKind::Tract => " (a build with --features ort can try ONNX Runtime: --backend ort)",
        BackendKind::Ort | BackendKind::Candle => "",
    }
}

/// Reads a whole file of at most `limit` bytes.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, InitError> {
    let read_err = |source| InitError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(InitError::NotAFile {
            path: path.to_owned(),
        });
    }
    if meta.len() > limit {
        return Err(InitError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .map_err(read_err)?;
    if bytes.len() as u64 > limit {
        return Err(InitError::TooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(bytes)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), InitError> {
    fs::write(path, bytes).map_err(|source| InitError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Runs `f`, turning an engine panic into [`InitError::Panicked`].
fn guarded<T>(
    path: &Path,
    engine: &'static str,
    stage: &'static str,
    f: impl FnOnce() -> Result<T, InitError>,
) -> Result<T, InitError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Err(InitError::Panicked {
            path: path.to_owned(),
            engine,
            stage,
            message,
        })
    })
}

/// A hidden folder of the repository the bundle is assembled in; removed unless committed.
struct Staging {
    dir: PathBuf,
    name: String,
    committed: bool,
}

impl Staging {
    fn new(repository: &Path, name: &str) -> Result<Staging, InitError> {
        // Hidden (leading '.'): the repository's scan and poller skip it. Created exclusively
        // under an unpredictable name (mode 0700): nothing someone else planted in the
        // repository (a link, a folder under a name we would pick) is followed or removed.
        let dir = tempfile::Builder::new()
            .prefix(&format!(".{name}.init-"))
            .tempdir_in(repository)
            .map_err(|source| InitError::Write {
                path: repository.to_owned(),
                source,
            })?
            .keep();
        Ok(Staging {
            dir,
            name: name.to_owned(),
            committed: false,
        })
    }

    /// Moves the assembled bundle to `dest` in one rename.
    fn commit(mut self, dest: &Path) -> Result<(), InitError> {
        if fs::symlink_metadata(dest).is_ok() {
            return Err(InitError::Exists {
                path: dest.to_owned(),
            });
        }
        fs::rename(self.dir.join(&self.name), dest).map_err(|source| InitError::Write {
            path: dest.to_owned(),
            source,
        })?;
        self.committed = true;
        let _ = fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn shape_text(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

fn spec_text(spec: &TensorSpec) -> String {
    format!("{} {}", spec.datatype.as_str(), shape_text(&spec.shape))
}

/// The output shapes the engine really produces, where its own metadata is wrong.
///
/// The model runs on zeros at batch 1 and (when the batch is open) batch 2. An output whose
/// reported shape does not fit what came out (another rank, or a fixed size that differs: an
/// engine that reports the file's wrong declaration, or no shape at all) is declared as it ran:
/// sizes that changed with the batch as `-1`, the others fixed. A reported shape that fits is
/// kept as reported (an open dimension stays open). A model that loads but fails on zeros is
/// refused here, as its warm-up would refuse it at load.
fn probe(
    backend: &mut dyn Backend,
    reported: &ModelMetadata,
    notes: &mut Vec<String>,
    model: &Path,
    engine: &'static str,
) -> Result<ModelMetadata, InitError> {
    let mut runs: Vec<Vec<Vec<usize>>> = vec![];
    let dynamic = reported.inputs.iter().any(TensorSpec::has_dynamic_batch);
    for batch in if dynamic { &[1, 2][..] } else { &[1][..] } {
        let inputs = match zeros(reported, *batch) {
            Zeros::Ready(inputs) => inputs,
            Zeros::Open => return Ok(reported.clone()),
            Zeros::TooLarge(bytes) => {
                notes.push(format!(
                    "not run on zeros: {bytes} bytes of inputs at batch {batch}, more than the \
                     {PROBE_MAX_BYTES} a probe or a warm-up allocates; output shapes as the engine reports them"
                ));
                return Ok(reported.clone());
            }
        };
        let outputs = guarded(model, engine, "running zeros through", || {
            backend
                .infer(inputs)
                .map_err(|source| InitError::SampleRun {
                    engine,
                    source: Box::new(source),
                })
        });
        match outputs {
            Ok(outputs) => runs.push(outputs.iter().map(|o| o.tensor.shape().to_vec()).collect()),
            Err(e) if *batch == 1 => return Err(e),
            Err(e) => {
                notes.push(format!(
                    "the model declares an open batch but fails on a batch of 2 zero rows ({e}): \
                     send one row per request, or re-export it"
                ));
                break;
            }
        }
    }
    let mut metadata = reported.clone();
    for (o, spec) in metadata.outputs.iter_mut().enumerate() {
        let seen: Vec<&Vec<usize>> = runs.iter().filter_map(|r| r.get(o)).collect();
        let fits = seen.iter().all(|shape| spec.accepts_shape(shape));
        if fits || seen.is_empty() || seen.iter().any(|s| s.len() != seen[0].len()) {
            continue;
        }
        let ran: Vec<i64> = (0..seen[0].len())
            .map(|d| {
                if seen.iter().all(|s| s[d] == seen[0][d]) {
                    seen[0][d] as i64
                } else {
                    -1
                }
            })
            .collect();
        notes.push(format!(
            "output {:?}: the {engine} engine reports {} but produces {} (on batches of {}): \
             the bundle declares what it produces",
            spec.name,
            shape_text(&spec.shape),
            shape_text(&ran),
            if seen.len() == 2 { "1 and 2" } else { "1" }
        ));
        spec.shape = ran;
    }
    Ok(metadata)
}

/// Where the file's declarations and what the engine runs disagree.
pub fn compare(declared: &DeclaredModel, runs: &ModelMetadata) -> Vec<Disagreement> {
    let mut out = vec![];
    for (kind, declared, runs) in [
        ("input", &declared.inputs, &runs.inputs),
        ("output", &declared.outputs, &runs.outputs),
    ] {
        for spec in runs {
            let Some(d) = declared.iter().find(|d| d.name == spec.name) else {
                out.push(Disagreement {
                    kind,
                    tensor: spec.name.clone(),
                    declared: "nothing (not a graph ".to_owned() + kind + ")",
                    runs: spec_text(spec),
                });
                continue;
            };
            let same =
                d.datatype() == Some(spec.datatype) && d.shape().as_ref() == Some(&spec.shape);
            if !same {
                out.push(Disagreement {
                    kind,
                    tensor: spec.name.clone(),
                    declared: d.describe(),
                    runs: spec_text(spec),
                });
            }
        }
        for d in declared {
            if !runs.iter().any(|s| s.name == d.name) {
                out.push(Disagreement {
                    kind,
                    tensor: d.name.clone(),
                    declared: d.describe(),
                    runs: "nothing (the engine has no such ".to_owned() + kind + ")",
                });
            }
        }
    }
    out
}

/// The sample rows, run, as a self-test.
struct Sample {
    /// Column names of the CSV header (the features of the first input).
    features: Vec<String>,
    rows: usize,
    /// The `selftest.json` text.
    json: String,
    /// Outputs whose values are compared exactly (integers).
    exact: Vec<String>,
}

/// Reads the sample CSV: a header naming the columns, then rows of numbers.
fn read_csv(path: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>), InitError> {
    let bytes = read_limited(path, SAMPLE_LIMIT)?;
    let sample_err = |reason: String| InitError::Sample {
        path: path.to_owned(),
        reason,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(&bytes[..]);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| sample_err(format!("cannot read the header: {e}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        return Err(sample_err(
            "the first line must be a header naming each column".into(),
        ));
    }
    if let Some(i) = header.iter().position(String::is_empty) {
        return Err(sample_err(format!("header column {} has no name", i + 1)));
    }
    if let Some(i) = header.iter().position(|h| h.parse::<f64>().is_ok()) {
        return Err(sample_err(format!(
            "header column {} is the number {:?}: the first line must name the columns",
            i + 1,
            header[i]
        )));
    }
    let mut rows = vec![];
    for record in reader.records() {
        let record = record.map_err(|e| sample_err(format!("not valid CSV: {e}")))?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        if record.len() != header.len() {
            return Err(sample_err(format!(
                "line {line} has {} columns, the header {}",
                record.len(),
                header.len()
            )));
        }
        if rows.len() == SAMPLE_MAX_ROWS {
            return Err(sample_err(format!(
                "more than {SAMPLE_MAX_ROWS} rows: a self-test needs a handful (10-50)"
            )));
        }
        let mut row = Vec::with_capacity(header.len());
        for (cell, column) in record.iter().zip(&header) {
            let cell_err = |reason| InitError::SampleCell {
                path: path.to_owned(),
                line,
                column: column.clone(),
                reason,
            };
            if cell.is_empty() {
                return Err(cell_err("empty cell (a sample row needs every value)"));
            }
            let v: f64 = cell.parse().map_err(|_| cell_err("not a number"))?;
            if !v.is_finite() {
                return Err(cell_err("not a finite number"));
            }
            row.push(v);
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(sample_err("no rows after the header".into()));
    }
    Ok((header, rows))
}

/// One tensor of `selftest.json` (the format `selftest.rs` reads).
#[derive(Serialize)]
struct JsonTensor {
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    data: JsonData,
}

#[derive(Serialize)]
#[serde(untagged)]
enum JsonData {
    // f32 (and f16, exactly widened) serialise as their shortest decimal form, which parses
    // back to the same value.
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U64(Vec<u64>),
}

/// A `selftest.json`, each tensor as its JSON text (an `f32` written as its own shortest
/// decimal form, which parses back to the same value; the inputs of an earlier version's file
/// as they were).
struct JsonFile {
    format: u32,
    producer: String,
    script: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

/// The tensor's values for `selftest.json`; `None` for BOOL/BYTES or non-finite floats.
fn json_data(t: &Tensor) -> Option<JsonData> {
    let finite32 = |v: Vec<f32>| v.iter().all(|x| x.is_finite()).then_some(JsonData::F32(v));
    Some(match t {
        Tensor::Fp16(a) => finite32(a.iter().map(|x| x.to_f32()).collect())?,
        Tensor::Fp32(a) => finite32(a.iter().copied().collect())?,
        Tensor::Fp64(a) => {
            let v: Vec<f64> = a.iter().copied().collect();
            v.iter()
                .all(|x| x.is_finite())
                .then_some(JsonData::F64(v))?
        }
        Tensor::Int8(a) => JsonData::I64(a.iter().map(|&x| i64::from(x)).collect()),
        Tensor::Int16(a) => JsonData::I64(a.iter().map(|&x| i64::from(x)).collect()),
        Tensor::Int32(a) => JsonData::I64(a.iter().map(|&x| i64::from(x)).collect()),
        Tensor::Int64(a) => JsonData::I64(a.iter().copied().collect()),
        Tensor::Uint8(a) => JsonData::U64(a.iter().map(|&x| u64::from(x)).collect()),
        Tensor::Uint16(a) => JsonData::U64(a.iter().map(|&x| u64::from(x)).collect()),
        Tensor::Uint32(a) => JsonData::U64(a.iter().map(|&x| u64::from(x)).collect()),
        Tensor::Uint64(a) => JsonData::U64(a.iter().copied().collect()),
        Tensor::Bool(_) | Tensor::Bytes(_) => return None,
    })
}

/// The sample rows as the model's single tabular input.
fn sample_tensor(
    path: &Path,
    spec: &TensorSpec,
    rows: &[Vec<f64>],
    columns: usize,
) -> Result<Tensor, InitError> {
    let sample_err = |reason: String| InitError::Sample {
        path: path.to_owned(),
        reason,
    };
    let [batch, width] = spec.shape[..] else {
        return Err(sample_err(format!(
            "--sample feeds tabular models (one input of shape [rows, features]); input {:?} \
             has shape {}: leave --sample out and add a self-test with models/train/selftest.py",
            spec.name,
            shape_text(&spec.shape)
        )));
    };
    if width >= 0 && width as usize != columns {
        return Err(sample_err(format!(
            "{columns} columns, but input {:?} takes {width} features ({})",
            spec.name,
            shape_text(&spec.shape)
        )));
    }
    if batch >= 0 && batch as usize != rows.len() {
        return Err(sample_err(format!(
            "{} rows, but input {:?} takes exactly {batch} per run ({}): give {batch}",
            rows.len(),
            spec.name,
            shape_text(&spec.shape)
        )));
    }
    let flat = rows.iter().flatten().copied();
    let shape = vec![rows.len(), columns];
    let whole = |what: &str| {
        sample_err(format!(
            "input {:?} is {what}: every sample value must be a whole number in its range",
            spec.name
        ))
    };
    macro_rules! ints {
        ($t:ty) => {{
            let v = flat
                .map(|x| {
                    (x.fract() == 0.0 && x >= <$t>::MIN as f64 && x <= <$t>::MAX as f64)
                        .then_some(x as $t)
                        .ok_or_else(|| whole(spec.datatype.as_str()))
                })
                .collect::<Result<Vec<$t>, _>>()?;
            Tensor::from_vec(shape, v)
        }};
    }
    let t = match spec.datatype {
        DataType::Fp32 => Tensor::from_vec(shape, flat.map(|x| x as f32).collect()),
        DataType::Fp64 => Tensor::from_vec(shape, flat.collect()),
        DataType::Fp16 => Tensor::from_vec(shape, flat.map(half::f16::from_f64).collect()),
        DataType::Int64 => ints!(i64),
        DataType::Int32 => ints!(i32),
        DataType::Int16 => ints!(i16),
        DataType::Int8 => ints!(i8),
        DataType::Uint8 => ints!(u8),
        DataType::Uint16 => ints!(u16),
        DataType::Uint32 => ints!(u32),
        other => {
            return Err(sample_err(format!(
                "input {:?} is {other}: --sample feeds numeric inputs only",
                spec.name
            )));
        }
    };
    t.map_err(|e| sample_err(e.to_string()))
}

fn sample_selftest(
    path: &Path,
    backend: &mut dyn Backend,
    metadata: &ModelMetadata,
    notes: &mut Vec<String>,
) -> Result<Sample, InitError> {
    let (features, rows) = read_csv(path)?;
    if metadata.inputs.len() != 1 {
        return Err(InitError::Sample {
            path: path.to_owned(),
            reason: format!(
                "the model has {} inputs ({:?}); --sample feeds a model with one tabular input",
                metadata.inputs.len(),
                metadata.inputs.iter().map(|s| &s.name).collect::<Vec<_>>()
            ),
        });
    }
    let spec = &metadata.inputs[0];
    let input = sample_tensor(path, spec, &rows, features.len())?;
    let input_json = JsonTensor {
        name: spec.name.clone(),
        datatype: input.datatype(),
        shape: input.shape().to_vec(),
        data: json_data(&input).ok_or_else(|| InitError::Sample {
            path: path.to_owned(),
            reason: "the sample does not convert to the input's datatype".into(),
        })?,
    };
    let engine = backend.name();
    let outputs = guarded(path, engine, "running the sample rows of", || {
        backend
            .infer(vec![NamedTensor::new(spec.name.clone(), input)])
            .map_err(|source| InitError::SampleRun {
                engine,
                source: Box::new(source),
            })
    })?;
    let mut json_outputs = vec![];
    let mut exact = vec![];
    for out in outputs {
        match json_data(&out.tensor) {
            Some(data) => {
                if matches!(data, JsonData::I64(_) | JsonData::U64(_)) {
                    exact.push(out.name.clone());
                }
                json_outputs.push(JsonTensor {
                    name: out.name,
                    datatype: out.tensor.datatype(),
                    shape: out.tensor.shape().to_vec(),
                    data,
                });
            }
            None => notes.push(format!(
                "output {:?} ({}) is left out of the self-test: {}",
                out.name,
                out.tensor.datatype(),
                if matches!(out.tensor.datatype(), DataType::Bool | DataType::Bytes) {
                    "a self-test compares numbers only"
                } else {
                    "the sample gives NaN or infinite values"
                }
            )),
        }
    }
    if json_outputs.is_empty() {
        return Err(InitError::Sample {
            path: path.to_owned(),
            reason: "no output of the model can be compared in a self-test (numbers only)".into(),
        });
    }
    let file = JsonFile {
        format: SELFTEST_FORMAT,
        producer: format!(
            "{engine} via nightingale models init {}: the serving engine itself, NOT an \
             independent reference (regenerate with models/train/selftest.py --reuse-inputs \
             for onnxruntime's)",
            env!("CARGO_PKG_VERSION")
        ),
        script: "nightingale models init".into(),
        inputs: vec![as_text(&input_json)?],
        outputs: json_outputs.iter().map(as_text).collect::<Result<_, _>>()?,
    };
    let json = selftest_json(&file).map_err(|e| InitError::Sample {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Sample {
        features,
        rows: rows.len(),
        json,
        exact,
    })
}

fn as_text(t: &JsonTensor) -> Result<String, InitError> {
    serde_json::to_string(t).map_err(|e| InitError::Manifest {
        reason: e.to_string(),
    })
}

/// `selftest.json` with one line per tensor, as `models/train/selftest.py` lays it out.
fn selftest_json(file: &JsonFile) -> serde_json::Result<String> {
    let tensors = |ts: &[String]| -> serde_json::Result<String> {
        Ok(format!("[\n  {}\n ]", ts.join(",\n  ")))
    };
    Ok(format!(
        "{{\n \"format\": {},\n \"producer\": {},\n \"script\": {},\n \"inputs\": {},\n \"outputs\": {}\n}}\n",
        file.format,
        serde_json::to_string(&file.producer)?,
        serde_json::to_string(&file.script)?,
        tensors(&file.inputs)?,
        tensors(&file.outputs)?
    ))
}

struct ManifestParts<'a> {
    name: &'a str,
    task: TaskKind,
    metadata: &'a ModelMetadata,
    declared: &'a DeclaredModel,
    source_name: &'a str,
    sample: Option<&'a Sample>,
    checksums: &'a [(&'a str, String)],
}

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn task_text(task: TaskKind) -> String {
    toml::Value::try_from(task)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "other".into())
}

/// Text from the ONNX file (its name, producer, dimension names) as it may stand in a TOML
/// comment: every control character (a newline above all, which would end the comment and
/// make the rest a setting: `allow_non_finite = true` from a dimension's name) shown as `?`.
fn comment_text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
        .collect()
}

fn manifest_text(p: &ManifestParts) -> String {
    let todo = |what: &str| q(&format!("{TODO_MARKER}: {what}"));
    let mut t = String::new();
    let mut line = |s: &str| {
        t.push_str(s);
        t.push('\n');
    };
    line(&format!(
        "# Scaffolded by `nightingale models init` from {} ({}).",
        comment_text(p.source_name),
        if p.declared.producer.is_empty() {
            "producer not recorded".to_owned()
        } else {
            comment_text(&p.declared.producer)
        }
    ));
    line("# Inputs and outputs are as the engine runs them. Fill in every \"TODO: ...\" field:");
    line("# `nightingale models check` reports each one until it is filled.");
    line("format_version = 1");
    line(&format!("name = {}", q(p.name)));
    line(&format!("task = {}", q(&task_text(p.task))));
    line(&format!(
        "description = {}",
        todo("what the model predicts, for whom, from what")
    ));
    line("platform = \"onnx\"");
    line("backend = \"any\"");
    line("# Replay protection: a server that served release N refuses an older signed manifest;");
    line("# `models init --version` raises it (docs/bundle-format.md, \"Releases\").");
    line("release = 1");
    line("");
    line("[version_policy]");
    line("policy = \"latest\"");
    line("latest = 1");
    line("");
    line("[batching]");
    if p.metadata.supports_batching() {
        line("# every input and output has a variable first dimension: set max_batch_size > 1");
        line("# to stack concurrent requests into one run (dynamic batching)");
    } else {
        line("# the model has a fixed first dimension somewhere: requests run one by one");
    }
    line("max_batch_size = 0");
    for (i, input) in p.metadata.inputs.iter().enumerate() {
        line("");
        line("[[inputs]]");
        line(&format!("name = {}", q(&input.name)));
        line(&format!("datatype = {}", q(input.datatype.as_str())));
        line(&format!("shape = {}", shape_text(&input.shape)));
        if let Some(d) = p.declared.inputs.iter().find(|d| d.name == input.name) {
            line(&format!(
                "# declared in the file: {}",
                comment_text(&d.describe())
            ));
        }
        if i == 0
            && let Some(s) = p.sample
        {
            let width = input.shape.last().copied().unwrap_or(-1);
            if width < 0 || width as usize == s.features.len() {
                line("# features: from the sample CSV's header, in column order. Add unit,");
                line("# description, code and min/max (the TRAINING data's range; the sample rows");
                line("# are not a training range, so none is written here).");
                for f in &s.features {
                    line("");
                    line("[[inputs.features]]");
                    line(&format!("name = {}", q(f)));
                }
            }
        }
    }
    for output in &p.metadata.outputs {
        line("");
        line("[[outputs]]");
        line(&format!("name = {}", q(&output.name)));
        line(&format!("datatype = {}", q(output.datatype.as_str())));
        line(&format!("shape = {}", shape_text(&output.shape)));
        if let Some(d) = p.declared.outputs.iter().find(|d| d.name == output.name) {
            line(&format!(
                "# declared in the file: {}",
                comment_text(&d.describe())
            ));
        }
    }
    line("");
    line("[intended_use]");
    line(&format!(
        "summary = {}",
        todo("the clinical question, the setting and the population it is for")
    ));
    line(&format!("users = {}", todo("who acts on its output")));
    line(&format!(
        "limitations = [{}]",
        todo("populations, inputs and uses it was not validated for")
    ));
    line("");
    line("[provenance]");
    line(&format!(
        "training_data = {}",
        todo("the data set, its source, dates and size")
    ));
    line(&format!(
        "data_licence = {}",
        todo("the licence of the training data")
    ));
    line(&format!(
        "model_licence = {}",
        todo("the licence of the model")
    ));
    line(&format!(
        "training_script = {}",
        todo("the script or repository that trained and exported it")
    ));
    if let Some(s) = p.sample {
        line("");
        line("[selftest]");
        line(&format!(
            "# 1/selftest.json: {} sample rows and reference outputs; its \"producer\" says which",
            s.rows
        ));
        line("# engine wrote them. `nightingale models init` writes the serving engine's own");
        line("# outputs: they catch a later change of engine or build but are not an independent");
        line("# reference. To replace them with onnxruntime's (same inputs):");
        line(&format!(
            "#   models/train/selftest.py <repository>/{} 1 --reuse-inputs --update-manifest",
            p.name
        ));
        line(&format!("file = {}", q(SELFTEST_FILE)));
        line(&format!("atol = {DEFAULT_ATOL:?}"));
        line(&format!("rtol = {DEFAULT_RTOL:?}"));
        for name in &s.exact {
            line("");
            line(&format!("[selftest.outputs.{}]", q(name)));
            line("atol = 0.0");
            line("rtol = 0.0");
        }
    }
    line("");
    line("[versions.1]");
    line(&format!(
        "description = {}",
        q(&format!(
            "{} as given to nightingale models init",
            p.source_name
        ))
    ));
    line("model_file = \"model.onnx\"");
    line("");
    line("[versions.1.files]");
    for (file, digest) in p.checksums {
        line(&format!("{} = {}", q(file), q(digest)));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The release line's number raised, the rest of the line kept (a comment, CRLF), one
    /// text per candidate line before the first table (a review's findings: a comment was
    /// dropped, CRLF lost, and a line inside a multi-line string raised in place of the key).
    #[test]
    fn release_lines_are_raised_in_place() {
        assert_eq!(
            raise_release("release = 1\nname = \"x\"\n", 1),
            ["release = 2\nname = \"x\"\n"]
        );
        assert_eq!(
            raise_release("release=9 # by hand\r\n", 9),
            ["release=10 # by hand\r\n"]
        );
        assert_eq!(raise_release("  release = 3", 3), ["  release = 4"]);
        assert!(raise_release("release = 12\n", 1).is_empty());
        assert!(raise_release("release = 1x\n", 1).is_empty());
        // A candidate after a table header too: the parse tells which one is the key.
        assert_eq!(
            raise_release("[t]\nrelease = 1\n", 1),
            ["[t]\nrelease = 2\n"]
        );
        let text = "description = \"\"\"\nrelease = 1\n\"\"\"\nrelease = 1\n";
        let candidates = raise_release(text, 1);
        assert_eq!(candidates.len(), 2);
        assert!(candidates[1].ends_with("\"\"\"\nrelease = 2\n"));
        assert!(candidates[1].contains("\nrelease = 1\n\"\"\""));
    }

    fn csv_error(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv");
        fs::write(&path, text).unwrap();
        read_csv(&path).unwrap_err().to_string()
    }

    #[test]
    fn staging_neither_follows_nor_removes_what_is_planted_under_a_predictable_name() {
        let repository = tempfile::tempdir().unwrap();
        // What `models init` named its staging folder before: someone else's folder there
        // was removed whole.
        let planted = repository
            .path()
            .join(format!(".demo.init-{}", std::process::id()));
        fs::create_dir(&planted).unwrap();
        fs::write(planted.join("keep.txt"), "theirs").unwrap();
        let staging = Staging::new(repository.path(), "demo").unwrap();
        assert_ne!(staging.dir, planted);
        assert!(
            staging
                .dir
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".demo.init-")
        );
        let made = staging.dir.clone();
        drop(staging);
        assert!(!made.exists(), "an uncommitted staging folder is removed");
        assert_eq!(
            fs::read_to_string(planted.join("keep.txt")).unwrap(),
            "theirs"
        );
    }

    #[test]
    fn sample_csv_errors_name_the_line_and_column_not_the_value() {
        let cases = [
            ("a,b\n1,2\n3\n", "line 3 has 1 columns, the header 2"),
            ("a,b\n1,2\n3,secret\n", "line 3, column \"b\": not a number"),
            ("a,b\n1,\n", "line 2, column \"b\": empty cell"),
            ("a,b\ninf,2\n", "line 2, column \"a\": not a finite number"),
            ("1,2\n1,2\n", "the first line must name the columns"),
            ("a,,c\n1,2,3\n", "header column 2 has no name"),
            ("a,b\n", "no rows after the header"),
        ];
        for (text, needle) in cases {
            let e = csv_error(text);
            assert!(e.contains(needle), "{needle}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let many = format!("a\n{}", "1\n".repeat(SAMPLE_MAX_ROWS + 1));
        assert!(csv_error(&many).contains("more than 1000 rows"));
    }

    #[test]
    fn disagreements_name_the_tensor_and_both_shapes() {
        use nightingale_inference::{DeclaredDim, DeclaredTensor, DeclaredType};
        let declared = DeclaredModel {
            inputs: vec![DeclaredTensor {
                name: "x".into(),
                ty: DeclaredType::Tensor {
                    datatype: Some(DataType::Fp32),
                    elem_type: 1,
                    shape: Some(vec![
                        DeclaredDim::Symbol("batch".into()),
                        DeclaredDim::Fixed(4),
                    ]),
                },
            }],
            outputs: vec![DeclaredTensor {
                name: "y".into(),
                ty: DeclaredType::Tensor {
                    datatype: Some(DataType::Fp32),
                    elem_type: 1,
                    shape: Some(vec![
                        DeclaredDim::Symbol("batch".into()),
                        DeclaredDim::Fixed(5),
                    ]),
                },
            }],
            producer: String::new(),
            opsets: vec![],
        };
        let spec = |name: &str, shape: Vec<i64>| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape,
        };
        let runs = ModelMetadata {
            inputs: vec![spec("x", vec![-1, 4])],
            outputs: vec![spec("y", vec![-1, 3])],
        };
        let d = compare(&declared, &runs);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            d[0].to_string(),
            "output \"y\": the file declares FP32 [batch, 5], the engine runs it as FP32 [-1, 3]; \
             the bundle declares what runs"
        );
    }

    #[test]
    fn toml_strings_are_quoted_and_escaped() {
        for tricky in [
            "a\"b",
            "it's",
            "back\\slash",
            "new\nline",
            "both ' and \"",
            "#x",
            "][",
        ] {
            let doc: toml::Table = toml::from_str(&format!("x = {}", q(tricky))).unwrap();
            assert_eq!(doc["x"].as_str(), Some(tricky));
        }
        assert_eq!(task_text(TaskKind::TabularRisk), "tabular-risk");
    }
}
