//! A Triton-style model repository: `<root>/<model>/bundle.toml` and
//! `<root>/<model>/<version>/…`, loaded, versioned, swapped and unloaded at run time.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nightingale_inference::{
    Backend, BackendKind, BatchingConfig, ExecutionProvider, LoadOptions, ModelMetadata,
    ModelWorker, TractKernels, WorkerConfig,
};

use crate::checksum::{NotRegular, open_regular, read_verified_keeping, verify_folder};
use crate::error::{BundleError, RepositoryError};
use crate::manifest::{BackendPreference, Manifest, SelfTestSpec, parse_version, valid_name};
use crate::selftest::{self, SelfTestError, SelfTestReport};
use crate::signature::{self, SignaturePolicy, SignatureStatus, SigningKey};

/// The manifest file of a bundle.
pub const MANIFEST_FILE: &str = "bundle.toml";
const MANIFEST_LIMIT: u64 = 1 << 20;

/// A model's name and the versions it loaded, or why it did not.
pub type LoadOutcome = (String, Result<Vec<u64>, RepositoryError>);

/// How the repository loads models.
#[derive(Clone, Debug, Default)]
pub struct RepositoryOptions {
    /// The engine for bundles whose `backend` is `any`, and the fallback when a bundle asks
    /// for an engine this build lacks.
    pub backend: BackendKind,
    pub intra_op_threads: usize,
    pub execution_provider: ExecutionProvider,
    /// ONNX Runtime shared library (ort backend); `None`: ort's own lookup (`ORT_DYLIB_PATH`).
    pub ort_library: Option<PathBuf>,
    /// tract only: whose convolution, max-pool and strided-slice kernels run (Nightingale's by default).
    pub tract_kernels: TractKernels,
    /// Which bundle signatures are trusted, and whether one is required.
    pub signatures: SignaturePolicy,
    /// Asked before each version loads (after checksums and signature): may it serve? (The
    /// server's `--require-validation`: a passing validation report for the manifest.)
    pub promotion: Option<PromotionCheck>,
    /// The highest release of each manifest served before (the server's data folder): an
    /// older manifest put back is refused ([`crate::releases`]). `None`: not checked.
    pub releases: Option<Arc<crate::releases::ReleaseLedger>>,
    /// The versions rollbacks pinned, kept across restarts (the server's data folder):
    /// start-up serves a pinned model's pinned version ([`Repository::persisted_pin`]).
    /// `None`: pins live in memory only.
    pub pins: Option<Arc<crate::releases::PinLedger>>,
    /// A `purpose` label on the loaded models' metrics (a validation run's copies:
    /// `validation`); `None` for the served repository.
    pub metrics_purpose: Option<String>,
    /// Loads each ONNX model in a process of its own first ([`ProbeCommand`]): one that
    /// stops that process (an allocation that cannot be made aborts, a stack overflow, a
    /// crash in the engine's native code) is refused, where it would have stopped the
    /// server. `None`: not probed (a library caller, a test).
    pub probe: Option<ProbeCommand>,
    /// tract only: the most bytes of tensors one run may keep alive at once (`0`: the
    /// engine's default, 4 GiB; the server's `--max-inference-bytes`).
    pub max_working_bytes: u64,
    /// The most engine threads (each served version's `instances`) all models may run
    /// together (`0`: [`DEFAULT_MAX_ENGINE_THREADS`]; the server's `--max-engine-threads`): a
    /// load that would pass it is refused, and what served before serves on.
    pub max_engine_threads: usize,
    /// At most this many instances of each version (`0`: the manifest's `instances`): a
    /// validation run's copies run one, so researchers' runs do not add their models'
    /// instances to the server's threads (they are outside the served repository's cap: a
    /// red-team finding, four runs of 64-instance models doubled it).
    pub instance_limit: usize,
}

/// The instances a version declaring `declared` runs under `options`.
fn instances_under(options: &RepositoryOptions, declared: usize) -> usize {
    match options.instance_limit {
        0 => declared,
        n => declared.min(n),
    }
}

/// The default cap on engine threads across a repository: a bundle of 40 versions
/// (`policy = "all"`) of 64 instances ran 2,568 threads before there was one (a red-team
/// finding); the reference bundles run 7.
pub const DEFAULT_MAX_ENGINE_THREADS: usize = 256;

/// The command that loads a model in a child process before the server loads it: the
/// server's own binary with its hidden `__probe-model` subcommand, given the model's verified
/// bytes on stdin and the load options as flags; it loads the model and runs it once on zeros
/// (as the warm-up does), and exits 0 or 1 with the engine's error. Killed by a signal, it
/// has shown that loading the model would have stopped the server. A red-team pass stopped
/// the whole server (and every restart) with a 7-node graph whose constant `Pad` asked tract
/// for 4 TB: Rust aborts on an allocation that fails, and `catch_unwind` sees no panic.
#[derive(Clone, Debug)]
pub struct ProbeCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// How long a model may take to load in the probe process before it is refused.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(900);

/// A deployment policy consulted before a version serves: `(model, version, manifest
/// SHA-256)` → `Err(reason)` to refuse it (it is then refused like a bad signature: what
/// served before keeps serving, and the index says why). The second part, when given,
/// summarises the evidence the policy reads (the validation reports): the repository poller
/// loads a refused model again once it changes, so a version refused for want of a report
/// serves when its passing report appears.
#[derive(Clone)]
pub struct PromotionCheck(pub Arc<PromotionFn>, pub Option<Arc<EvidenceFn>>);

/// `(model, version, manifest SHA-256)` → may it serve.
pub type PromotionFn = dyn Fn(&str, u64, &str) -> Result<(), String> + Send + Sync;

/// A digest of what a [`PromotionFn`] reads; equal digests mean it would judge alike.
pub type EvidenceFn = dyn Fn() -> [u8; 32] + Send + Sync;

impl std::fmt::Debug for PromotionCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PromotionCheck(..)")
    }
}

/// A bundle folder with its parsed manifest.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// What the manifest's signature established.
    pub signature: SignatureStatus,
    /// The manifest's exact text, as parsed (and as its signature covers).
    pub(crate) text: Arc<str>,
    /// SHA-256 of that text (hex): what the audit trail's load records and the deployment
    /// policy name the manifest by.
    pub manifest_sha256: String,
}

impl Bundle {
    /// Reads and checks `dir/bundle.toml`, trusting no signing key and requiring none (a
    /// signature is reported, not checked). See [`Bundle::open_with`].
    pub fn open(dir: &Path) -> Result<Bundle, BundleError> {
        Bundle::open_with(dir, &SignaturePolicy::default())
    }

    /// Reads and checks `dir/bundle.toml` and its signature under `policy`: the signature is
    /// checked against the very bytes parsed, before they are parsed (with signatures
    /// required, only signed text reaches the TOML parser). The manifest must be a regular
    /// file in the bundle's folder: a symbolic link is refused unread, as a version's files
    /// are, since it could point anywhere on the server and a parse error would quote it.
    pub fn open_with(dir: &Path, policy: &SignaturePolicy) -> Result<Bundle, BundleError> {
        let path = dir.join(MANIFEST_FILE);
        let file = open_regular(&path).map_err(|e| match e {
            NotRegular::Kind => BundleError::NotRegularFile { path: path.clone() },
            NotRegular::Io(e) => BundleError::io(&path, e),
        })?;
        let mut text = String::new();
        file.take(MANIFEST_LIMIT + 1)
            .read_to_string(&mut text)
            .map_err(|e| BundleError::io(&path, e))?;
        if text.len() as u64 > MANIFEST_LIMIT {
            return Err(BundleError::ManifestTooLarge {
                path,
                limit: MANIFEST_LIMIT,
            });
        }
        let signature = signature::check_manifest(dir, text.as_bytes(), policy)?;
        let manifest = Manifest::parse(&text).map_err(|source| BundleError::Manifest {
            path: path.clone(),
            source,
        })?;
        let folder = dir
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if folder != manifest.name {
            return Err(BundleError::NameMismatch {
                path,
                declared: manifest.name,
                folder,
            });
        }
        let manifest_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()));
        Ok(Bundle {
            dir: dir.to_owned(),
            manifest,
            signature,
            text: text.into(),
            manifest_sha256,
        })
    }

    /// Signs the manifest with `key` after checking every version folder on disk against its
    /// checksums (a signature vouches for what is there), writing `bundle.toml.minisig`
    /// atomically. The signature then verifies with the key's public half (checked).
    pub fn sign(&self, key: &SigningKey) -> Result<PathBuf, BundleError> {
        for version in self.versions_on_disk()? {
            self.verify(version)?;
        }
        let text = key.sign(
            self.text.as_bytes(),
            &signature::bundle_trusted_comment(&self.manifest.name),
        );
        let path = self.dir.join(signature::SIGNATURE_FILE);
        write_atomic_in(&self.dir, &path, text.as_bytes())?;
        let policy = SignaturePolicy {
            trusted: vec![key.trusted_key()],
            require: true,
        };
        signature::check_manifest(&self.dir, self.text.as_bytes(), &policy)?;
        Ok(path)
    }

    /// Version folders present on disk, ascending. A folder the manifest does not list is an
    /// error, and so is an entry named like a version that is not a folder itself (a symbolic
    /// link to a folder, a file): skipping it would silently stop serving a version the
    /// manifest lists and the policy selects, with nothing in the index to say why.
    pub fn versions_on_disk(&self) -> Result<Vec<u64>, BundleError> {
        let mut versions = vec![];
        for entry in fs::read_dir(&self.dir).map_err(|e| BundleError::io(&self.dir, e))? {
            let entry = entry.map_err(|e| BundleError::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(v) = parse_version(&name) else {
                // Other entries (a README, the signature) are not versions; but a folder named
                // like a number that is not one ("01", "1 ") would be a version silently
                // skipped.
                if name.trim().parse::<u64>().is_ok() {
                    return Err(BundleError::UnlistedVersion {
                        path: entry.path(),
                        version: name,
                    });
                }
                continue;
            };
            // `DirEntry::file_type` does not follow symbolic links.
            if !entry
                .file_type()
                .map_err(|e| BundleError::io(entry.path(), e))?
                .is_dir()
            {
                return Err(BundleError::VersionNotAFolder {
                    path: entry.path(),
                    version: v,
                });
            }
            if !self.manifest.versions.contains_key(&name) {
                return Err(BundleError::UnlistedVersion {
                    path: entry.path(),
                    version: name,
                });
            }
            versions.push(v);
        }
        versions.sort_unstable();
        Ok(versions)
    }

    /// The versions the policy serves.
    pub fn selected_versions(&self) -> Result<Vec<u64>, BundleError> {
        let policy = &self.manifest.version_policy;
        let on_disk = self.versions_on_disk()?;
        let selected = policy.select(&on_disk);
        // The policy picks among the folders present (a retired version's folder may go), so
        // a listed version without one is not an error; but it should not vanish unsaid.
        let listed: Vec<u64> = self
            .manifest
            .versions
            .keys()
            .filter_map(|k| parse_version(k))
            .collect();
        for missing in policy.select(&listed) {
            if !on_disk.contains(&missing) {
                tracing::warn!(model = %self.manifest.name, version = missing,
                    "bundle.toml lists this version and the policy would serve it, but it has no folder: not served");
            }
        }
        if selected.is_empty() {
            return Err(BundleError::NoVersions {
                path: self.dir.clone(),
            });
        }
        Ok(selected)
    }

    /// The instances each version of this bundle runs under `options`.
    pub fn instances(&self, options: &RepositoryOptions) -> usize {
        instances_under(options, self.manifest.batching.instances)
    }

    /// Checks one version folder's files against their checksums.
    pub fn verify(&self, version: u64) -> Result<(), BundleError> {
        let entry = &self.manifest.versions[&version.to_string()];
        verify_folder(&self.dir.join(version.to_string()), &entry.files)
    }

    /// The engine this bundle runs on under `options`.
    pub fn backend(&self, options: &RepositoryOptions) -> BackendKind {
        if self.manifest.candle.is_some() {
            return BackendKind::Candle;
        }
        let wanted = match self.manifest.backend {
            BackendPreference::Any => return options.backend,
            BackendPreference::Tract => BackendKind::Tract,
            BackendPreference::Ort => BackendKind::Ort,
        };
        if wanted.is_compiled() {
            wanted
        } else {
            tracing::warn!(model = %self.manifest.name, wanted = %wanted, using = %options.backend,
                "the bundle prefers a backend this build lacks; using the server default");
            options.backend
        }
    }

    /// Verifies, loads, checks the declared inputs/outputs, warms up, self-tests and starts
    /// serving one version. Each file of the version folder is read once; the model is loaded
    /// from the bytes that were hashed. A panic in the engine is caught and reported as the
    /// version's error.
    pub fn load_version(
        &self,
        version: u64,
        options: &RepositoryOptions,
    ) -> Result<LoadedModel, BundleError> {
        let vdir = self.dir.join(version.to_string());
        let entry = &self.manifest.versions[&version.to_string()];
        // Only what the load reads is held: the model, its self-test and a candle bundle's
        // architecture file; the other listed files are checked and not kept.
        let wanted = |name: &str| {
            name == entry.model_file
                || self
                    .manifest
                    .selftest
                    .as_ref()
                    .is_some_and(|s| s.file == name)
                || self
                    .manifest
                    .candle
                    .as_ref()
                    .is_some_and(|c| c.config == name)
        };
        let mut files = read_verified_keeping(&vdir, &entry.files, wanted)?;
        let model_path = vdir.join(&entry.model_file);
        let model = files
            .remove(&entry.model_file)
            .ok_or_else(|| BundleError::MissingFile {
                path: model_path.clone(),
            })?;
        let selftest = self
            .manifest
            .selftest
            .as_ref()
            .and_then(|spec| Some((spec, files.remove(&spec.file)?)));
        // A candle bundle's architecture file, verified with the rest of the folder.
        let candle_config = match &self.manifest.candle {
            Some(c) => Some(
                files
                    .remove(&c.config)
                    .ok_or_else(|| BundleError::MissingFile {
                        path: vdir.join(&c.config),
                    })?,
            ),
            None => None,
        };
        // What the audit trail names the model by. A candle network is its architecture
        // file and its weights: the weights' checksum alone named two networks alike (a
        // review changed the architecture file under the same weights), so it is the SHA-256
        // of the architecture file's bytes followed by the weights' (`cat architecture.json
        // model.safetensors | sha256sum`).
        let model_sha256 = match &candle_config {
            Some(config) => {
                use sha2::Digest as _;
                let mut h = sha2::Sha256::new();
                h.update(config);
                h.update(&model);
                hex::encode(h.finalize())
            }
            None => entry.files[&entry.model_file].to_ascii_lowercase(),
        };
        let model = Model {
            bytes: &model,
            candle_config: candle_config.as_deref(),
        };
        let engine = self.backend(options);
        let prepared = match self.prepare(engine, version, model, selftest.as_ref(), options) {
            Err(BundleError::SelfTest {
                path,
                engine: "tract",
                source,
            }) if self.manifest.backend == BackendPreference::Any
                && BackendKind::Ort.is_compiled()
                && !matches!(*source, SelfTestError::Invalid { .. }) =>
            {
                tracing::warn!(model = %self.manifest.name, version, file = %path.display(),
                    reason = %source,
                    "self-test failed on tract; the bundle allows any engine, falling back to ort");
                self.prepare(BackendKind::Ort, version, model, selftest.as_ref(), options)?
            }
            other => other?,
        };
        let (backend, declared, report) = prepared;
        if let Some(report) = &report {
            tracing::info!(model = %self.manifest.name, version, engine = report.engine,
                rows = report.rows, max_diff = report.max_diff, "self-test passed");
        }
        let b = &self.manifest.batching;
        let config = WorkerConfig {
            model: self.manifest.name.clone(),
            version: version.to_string(),
            instances: self.instances(options),
            queue_capacity: b.queue_capacity,
            queue_bytes: b.queue_bytes,
            max_rows_per_request: b.max_rows_per_request,
            batching: (b.max_batch_size > 1).then(|| BatchingConfig {
                max_batch_size: b.max_batch_size,
                max_queue_delay: Duration::from_micros(b.max_queue_delay_us),
                preferred_batch_sizes: b.preferred_batch_sizes.clone(),
            }),
            metadata: Some(declared),
            allow_non_finite: self
                .manifest
                .inputs
                .iter()
                .filter(|i| i.allow_non_finite)
                .map(|i| i.name.clone())
                .collect(),
            purpose: options.metrics_purpose.clone(),
            ..WorkerConfig::default()
        };
        let engine_name = backend.name();
        let worker = guarded(&model_path, engine_name, "starting its instances", || {
            ModelWorker::spawn(backend, config).map_err(|source| BundleError::Inference {
                path: model_path.clone(),
                source,
            })
        })?;
        Ok(LoadedModel {
            name: self.manifest.name.clone(),
            version,
            manifest: Arc::new(self.manifest.clone()),
            model_sha256,
            manifest_sha256: self.manifest_sha256.clone(),
            selftest: report,
            signature: self.signature.clone(),
            loaded_at: std::time::SystemTime::now(),
            worker,
        })
    }

    /// Loads the model bytes on one engine, checks its metadata, warms it up and runs the
    /// self-test, each step under `catch_unwind`.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        engine: BackendKind,
        version: u64,
        model: Model<'_>,
        selftest: Option<&(&SelfTestSpec, Vec<u8>)>,
        options: &RepositoryOptions,
    ) -> Result<(Box<dyn Backend>, ModelMetadata, Option<SelfTestReport>), BundleError> {
        let entry = &self.manifest.versions[&version.to_string()];
        let vdir = self.dir.join(version.to_string());
        let model_path = vdir.join(&entry.model_file);
        // Errors from the engine name the model by its place in the repository.
        let name = Path::new(&self.manifest.name)
            .join(version.to_string())
            .join(&entry.model_file);
        let inference_err = |source| BundleError::Inference {
            path: model_path.clone(),
            source,
        };
        let load = LoadOptions {
            backend: engine,
            intra_op_threads: options.intra_op_threads,
            execution_provider: options.execution_provider,
            ort_library: options.ort_library.clone(),
            tract_kernels: options.tract_kernels,
            // The batcher's sizes, each planned on the GPU before the model serves.
            gpu_warm_up_rows: self.manifest.batching.max_batch_size.max(1),
            max_working_bytes: options.max_working_bytes,
        };
        let engine_name = engine.as_str();
        // A candle bundle too: its architecture is checked strictly, but a load of hundreds
        // of large layers still took minutes and gigabytes in the server's own process (a
        // review's finding); in the probe it is bounded in time, and a load that the kernel
        // stops for memory stops the probe, not the server.
        if let Some(probe) = &options.probe {
            let input = ProbeInput {
                manifest: &self.text,
                version,
                model: model.bytes,
                selftest: selftest.map(|(_, bytes)| bytes.as_slice()),
                candle_config: model.candle_config,
            };
            probe_in_child(probe, &input, &load, &model_path, engine_name)?;
        }
        let mut backend = guarded(&model_path, engine_name, "loading the model", || {
            match (&self.manifest.candle, model.candle_config) {
                (Some(spec), Some(config)) => {
                    let config_name = name.with_file_name(&spec.config);
                    nightingale_inference::load_candle(
                        &spec.architecture,
                        config,
                        &config_name,
                        model.bytes,
                        &name,
                        &load,
                    )
                    // The architecture file's errors name it (they named the weights).
                    .map_err(|source| match &source {
                        nightingale_inference::InferenceError::Load { path, .. }
                            if *path == config_name =>
                        {
                            BundleError::Inference {
                                path: vdir.join(&spec.config),
                                source,
                            }
                        }
                        _ => inference_err(source),
                    })
                }
                _ => nightingale_inference::load_bytes(model.bytes, &name, &load)
                    .map_err(inference_err),
            }
        })?;
        let declared = self
            .manifest
            .metadata_in_order(backend.metadata())
            .and_then(|declared| {
                if let Some(config) = model.candle_config {
                    self.manifest.check_candle_output(config)?;
                }
                Ok(declared)
            })
            .map_err(|source| BundleError::Manifest {
                path: self.dir.join(MANIFEST_FILE),
                source,
            })?;
        guarded(&model_path, engine_name, "warming up", || {
            warm_up(&self.manifest.name, backend.as_mut(), &declared).map_err(inference_err)
        })?;
        let report = match selftest {
            None => None,
            Some((spec, bytes)) => {
                let path = vdir.join(&spec.file);
                Some(guarded(
                    &path,
                    engine_name,
                    "running the self-test",
                    || {
                        selftest::run(backend.as_mut(), &declared, spec, bytes).map_err(|source| {
                            BundleError::SelfTest {
                                path: path.clone(),
                                engine: engine_name,
                                source: Box::new(source),
                            }
                        })
                    },
                )?)
            }
        };
        Ok((backend, declared, report))
    }
}

/// The verified bytes an engine loads: the model file, and a candle bundle's architecture file.
#[derive(Clone, Copy)]
struct Model<'a> {
    bytes: &'a [u8],
    candle_config: Option<&'a [u8]>,
}

/// Runs `f`, turning a panic into [`BundleError::Panicked`]: an engine that panics on a model
/// fails that model's load and nothing else.
fn guarded<T>(
    path: &Path,
    engine: &'static str,
    stage: &'static str,
    f: impl FnOnce() -> Result<T, BundleError>,
) -> Result<T, BundleError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = panic_message(payload.as_ref());
        tracing::error!(file = %path.display(), engine, stage, %message, "the engine panicked");
        Err(BundleError::Panicked {
            path: path.to_owned(),
            engine,
            stage,
            message,
        })
    })
}

/// Loads `bytes` in the probe process ([`ProbeCommand`]) and waits for it (at most
/// [`PROBE_TIMEOUT`]): refused when a signal stopped it or it did not end in time. An exit
/// with an error is no verdict: the load in this process then says what is wrong.
fn probe_in_child(
    probe: &ProbeCommand,
    input: &ProbeInput<'_>,
    load: &LoadOptions,
    path: &Path,
    engine: &'static str,
) -> Result<(), BundleError> {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let crashed = |message: String| BundleError::Crashed {
        path: path.to_owned(),
        engine,
        message,
    };
    let mut command = std::process::Command::new(&probe.program);
    command
        .args(&probe.args)
        .arg("--backend")
        .arg(load.backend.as_str())
        .arg("--intra-op-threads")
        .arg(load.intra_op_threads.to_string())
        .arg("--version")
        .arg(input.version.to_string())
        .arg("--max-inference-bytes")
        .arg(load.max_working_bytes.to_string())
        .arg("--tract-kernels")
        .arg(match load.tract_kernels {
            nightingale_inference::TractKernels::Nightingale => "nightingale",
            nightingale_inference::TractKernels::Tract => "tract",
        })
        // The engine's last words, not a backtrace after them.
        .env("RUST_BACKTRACE", "0")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(library) = &load.ort_library {
        command.arg("--ort-library").arg(library);
    }
    let mut child = command
        .spawn()
        .map_err(|e| crashed(format!("the probe process could not start: {e}")))?;
    let stdin = child.stdin.take();
    let stderr = child.stderr.take();
    let (status, said) = std::thread::scope(|scope| {
        // Fed and read on threads of their own: a child that stops reading (or writing)
        // cannot block the wait, which is bounded.
        scope.spawn(move || {
            if let Some(mut stdin) = stdin {
                let _ = input.write_to(&mut stdin);
            }
        });
        let reader = scope.spawn(move || {
            let mut said = Vec::new();
            if let Some(mut stderr) = stderr {
                let _ = (&mut stderr).take(64 << 10).read_to_end(&mut said);
                let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            }
            said
        });
        let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        (status, reader.join().unwrap_or_default())
    });
    // The first line the process wrote that is not a note ("memory allocation of N bytes
    // failed", "thread 'main' has overflowed its stack", a panic's message).
    let last_words = String::from_utf8_lossy(&said)
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with("note:"))
        .map(|l| {
            l.chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect::<String>()
        })
        .unwrap_or_default();
    match status {
        None => Err(crashed(format!(
            "it did not load within {} s",
            PROBE_TIMEOUT.as_secs()
        ))),
        Some(status) => match status.signal() {
            Some(signal) => {
                let name = match signal {
                    6 => " (SIGABRT)",
                    11 => " (SIGSEGV)",
                    7 => " (SIGBUS)",
                    4 => " (SIGILL)",
                    9 => " (SIGKILL: out of memory?)",
                    _ => "",
                };
                tracing::error!(file = %path.display(), engine, signal, said = %last_words,
                    "loading the model stopped the probe process: refused");
                Err(crashed(format!(
                    "signal {signal}{name}{}",
                    if last_words.is_empty() {
                        String::new()
                    } else {
                        format!(": {last_words}")
                    }
                )))
            }
            None => Ok(()),
        },
    }
}

/// What the probe process is given on its stdin: the manifest's text, the model's verified
/// bytes and the self-test's, each after its length (8 bytes, little-endian; a self-test's
/// `u64::MAX` when there is none). With them it does what [`Bundle::prepare`] does here: the
/// load, the warm-up with the manifest's shapes and the self-test with its inputs (a probe
/// that warmed up with the file's own shapes passed models that the warm-up with pinned
/// dimensions, or the self-test's rows, then aborted in the server: a re-attack's finding).
struct ProbeInput<'a> {
    manifest: &'a str,
    version: u64,
    model: &'a [u8],
    selftest: Option<&'a [u8]>,
    /// A candle bundle's architecture file.
    candle_config: Option<&'a [u8]>,
}

impl ProbeInput<'_> {
    fn write_to(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        for part in [
            Some(self.manifest.as_bytes()),
            Some(self.model),
            self.selftest,
            self.candle_config,
        ] {
            match part {
                Some(bytes) => {
                    out.write_all(&(bytes.len() as u64).to_le_bytes())?;
                    out.write_all(bytes)?;
                }
                None => out.write_all(&u64::MAX.to_le_bytes())?,
            }
        }
        out.flush()
    }
}

/// The probe process's side ([`ProbeCommand`]): reads a [`ProbeInput`] from `input` and
/// prepares `version` of that manifest as the server would (on `options.backend`, without a
/// probe of its own): the engine's load, the warm-up and the self-test. Its error, if any,
/// as text.
pub fn probe_load(
    input: &mut impl std::io::Read,
    version: u64,
    options: &RepositoryOptions,
) -> Result<(), String> {
    fn part(input: &mut impl std::io::Read, limit: u64) -> Result<Option<Vec<u8>>, String> {
        let mut len = [0u8; 8];
        input
            .read_exact(&mut len)
            .map_err(|e| format!("cannot read the probe's input: {e}"))?;
        let len = u64::from_le_bytes(len);
        if len == u64::MAX {
            return Ok(None);
        }
        if len > limit {
            return Err(format!(
                "a part of {len} bytes is over the limit of {limit}"
            ));
        }
        let mut bytes = Vec::new();
        input
            .take(len)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the probe's input: {e}"))?;
        if bytes.len() as u64 != len {
            return Err("the probe's input ends early".to_owned());
        }
        Ok(Some(bytes))
    }
    let text = part(input, MANIFEST_LIMIT)?.ok_or("no manifest")?;
    let text = String::from_utf8(text).map_err(|_| "the manifest is not UTF-8".to_owned())?;
    let model = part(input, crate::FILE_LIMIT)?.ok_or("no model")?;
    let selftest_bytes = part(input, crate::FILE_LIMIT)?;
    let candle_config = part(input, crate::FILE_LIMIT)?;
    let manifest = Manifest::parse(&text).map_err(|e| e.to_string())?;
    let bundle = Bundle {
        dir: PathBuf::from(&manifest.name),
        manifest,
        signature: SignatureStatus::Unsigned,
        text: text.into(),
        manifest_sha256: String::new(),
    };
    if !bundle.manifest.versions.contains_key(&version.to_string()) {
        return Err(format!("the manifest has no version {version}"));
    }
    let selftest = bundle.manifest.selftest.as_ref().zip(selftest_bytes);
    let options = RepositoryOptions {
        probe: None,
        ..options.clone()
    };
    let model = Model {
        bytes: &model,
        candle_config: candle_config.as_deref(),
    };
    bundle
        .prepare(options.backend, version, model, selftest.as_ref(), &options)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

pub use nightingale_inference::{PROBE_MAX_BYTES, Zeros, zeros};

/// Runs the model once on zeros (batch 1) when every input's shape is known but for the
/// batch: a model that loads but cannot run is refused before it serves. A model whose one
/// row of inputs is over [`PROBE_MAX_BYTES`] is not warmed up (said in the log).
fn warm_up(
    name: &str,
    backend: &mut dyn nightingale_inference::Backend,
    declared: &nightingale_inference::ModelMetadata,
) -> Result<(), nightingale_inference::InferenceError> {
    match zeros(declared, 1) {
        Zeros::Ready(inputs) => backend.infer(inputs).map(|_| ()),
        Zeros::Open => Ok(()),
        Zeros::TooLarge(bytes) => {
            tracing::warn!(
                model = name,
                bytes,
                limit = PROBE_MAX_BYTES,
                "not warmed up: one row of its inputs is larger than a warm-up may allocate"
            );
            Ok(())
        }
    }
}

/// A model version being served.
#[derive(Debug)]
pub struct LoadedModel {
    pub name: String,
    pub version: u64,
    pub manifest: Arc<Manifest>,
    /// SHA-256 of the model file, as verified at load.
    pub model_sha256: String,
    /// SHA-256 of the bundle's manifest text this version was loaded with (labels,
    /// thresholds and preprocessing change answers without changing the model file).
    pub manifest_sha256: String,
    /// The load-time self-test's result (`None`: the bundle declares no `[selftest]`).
    pub selftest: Option<SelfTestReport>,
    /// What the bundle's signature established when this version was loaded.
    pub signature: SignatureStatus,
    /// When this version started serving.
    pub loaded_at: std::time::SystemTime,
    pub worker: ModelWorker,
}

/// Load state of a model, as the repository index reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelState {
    Ready,
    Unavailable { reason: String },
    Unloaded,
}

impl ModelState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelState::Ready => "READY",
            ModelState::Unavailable { .. } => "UNAVAILABLE",
            ModelState::Unloaded => "UNLOADED",
        }
    }
}

/// One row of the repository index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: Option<u64>,
    pub state: ModelState,
    /// The engine serving a ready version (`tract`, `ort`).
    pub backend: Option<&'static str>,
    /// A ready version's signature, as checked when it was loaded.
    pub signature: Option<SignatureStatus>,
    /// A ready version's load-time self-test (`None`: none declared, or not ready).
    pub selftest: Option<String>,
    /// When a ready version started serving, or when a failed load was refused.
    pub at: Option<std::time::SystemTime>,
    /// Served by a rollback to this version (the version policy is set aside until the next
    /// plain load).
    pub pinned: bool,
}

/// What a load asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadTarget {
    /// The versions the bundle's version policy selects (and clears a rollback's pin).
    Policy,
    /// As `Policy`, unless a rollback has pinned the model: then nothing is loaded and the
    /// load answers [`RepositoryError::Pinned`]. The pin is read under the load lock, after
    /// any load in flight (a rollback, say) has finished, so a load queued behind a rollback
    /// never undoes it. The repository poller's loads.
    PolicyUnlessPinned,
    /// Exactly this version, alone, whatever the policy says (a rollback).
    Version(u64),
}

/// A load that was refused while other versions kept serving (shown in the index).
#[derive(Clone, Debug)]
struct Refused {
    version: Option<u64>,
    reason: String,
    at: std::time::SystemTime,
    /// Refused by the deployment policy, which read this evidence (see [`PromotionCheck`]).
    promotion_evidence: Option<[u8; 32]>,
}

#[derive(Debug, Default)]
struct Entry {
    versions: BTreeMap<u64, Arc<LoadedModel>>,
    state: Option<ModelState>,
    /// The repository's unload count when this model was last unloaded: a load that started
    /// before it discards what it loaded.
    unloaded_at: u64,
    /// The last load's failure, while older versions serve (cleared by a good load).
    refused: Option<Refused>,
    /// Set by a rollback: the one version served until the next plain load.
    pinned: Option<u64>,
    /// Unloaded by model control (an operator's unload, e.g. a recall): loads that honour
    /// pins (the repository poller's) leave it unloaded until a plain load asks for it.
    held: bool,
    /// The `[dicom]` section of the newest version it served when it was last unloaded (an
    /// imaging bundle the DICOM pipeline routes series to, and what it accepted).
    unloaded_dicom: Option<crate::manifest::DicomAccepts>,
}

/// Counts a load out of [`Repository::loads_pending`] when it returns (or unwinds).
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Asked with the versions about to start serving and those about to stop (served before,
/// not among the new ones: a version folder removed, a rollback to one version), just before
/// the swap (see [`Repository::load_target_committed`]); an error keeps things as they are.
pub type CommitLoad<'a> =
    dyn Fn(&[Arc<LoadedModel>], &[Arc<LoadedModel>]) -> Result<(), String> + 'a;

/// Asked with the versions about to stop serving (none: the model served nothing), just
/// before an unload (see [`Repository::unload_committed`]); an error keeps them serving.
pub type CommitUnload<'a> = dyn Fn(&[Arc<LoadedModel>]) -> Result<(), String> + 'a;

/// The served models. Cheap to share behind an `Arc`; loading happens outside the lock and
/// swaps versions in at once, so requests never see a half-loaded model.
#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    options: RepositoryOptions,
    models: RwLock<BTreeMap<String, Entry>>,
    /// One load at a time. Unloads never wait for it (they run on the async runtime's
    /// blocking pool, and a load can take minutes).
    loading: Mutex<()>,
    /// Loads running or waiting for the one before them; see [`Repository::loads_pending`].
    pending: AtomicUsize,
    /// Unloads so far; see `Entry::unloaded_at`.
    unloads: AtomicU64,
    /// Held by a load's or an unload's decision (its checks, its commit, its change of what
    /// serves): the commit (the audit record's write, which may wait on a slow store) runs
    /// under it, never under `models`, which every request reads.
    control: Mutex<()>,
}

impl Repository {
    pub fn new(root: impl Into<PathBuf>, options: RepositoryOptions) -> Self {
        Repository {
            root: root.into(),
            options,
            models: RwLock::default(),
            loading: Mutex::default(),
            pending: AtomicUsize::new(0),
            unloads: AtomicU64::new(0),
            control: Mutex::default(),
        }
    }

    /// How this repository loads versions (engine, threads, execution provider, signatures).
    pub fn options(&self) -> &RepositoryOptions {
        &self.options
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Names of the model folders under the root (those holding a `bundle.toml`).
    pub fn scan(&self) -> Result<Vec<String>, RepositoryError> {
        let io = |source| RepositoryError::Io {
            path: self.root.clone(),
            source: Arc::new(source),
        };
        let mut names = vec![];
        for entry in fs::read_dir(&self.root).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_name(&name) && entry.path().join(MANIFEST_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Folders under the root that [`Repository::scan`] passes over, with why: a name that
    /// is not a bundle's, or no `bundle.toml` that is a file (a dangling link, a folder).
    /// Hidden entries (a leading `.`) and files are not bundles and are not listed. A folder
    /// passed over without a word looked like a repository of fewer bundles (a review's
    /// finding: `models check` said ok).
    pub fn passed_over(&self) -> Vec<(String, &'static str)> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return vec![];
        };
        let mut out: Vec<(String, &'static str)> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .filter_map(|name| {
                let reason = if !valid_name(&name) {
                    "not a bundle name (letters, digits, '.', '_' and '-', at most 128)"
                } else if !self.root.join(&name).join(MANIFEST_FILE).is_file() {
                    "no bundle.toml file in it"
                } else {
                    return None;
                };
                Some((name, reason))
            })
            .collect();
        out.sort();
        out
    }

    /// Loads every bundle in the repository. A bundle that fails (or whose engine panics) is
    /// logged and marked unavailable; the others serve.
    pub fn load_all(&self) -> Result<Vec<LoadOutcome>, RepositoryError> {
        for (name, reason) in self.passed_over() {
            tracing::warn!(folder = %name, reason, "not a bundle: passed over");
        }
        // `load_target` catches panics itself: a panicking bundle is an error like any other.
        Ok(self
            .scan()?
            .into_iter()
            .map(|name| {
                let result = self.load(&name);
                (name, result)
            })
            .collect())
    }

    /// (Re)loads one model from disk: the versions its policy selects replace those served.
    /// Errors name files relative to the repository root (they are answered over HTTP); the
    /// log keeps full paths.
    pub fn load(&self, name: &str) -> Result<Vec<u64>, RepositoryError> {
        Ok(self
            .load_target(name, LoadTarget::Policy)?
            .iter()
            .map(|m| m.version)
            .collect())
    }

    /// Loads what `target` asks for and swaps it in at once; returns what now serves. On
    /// failure the versions already serving keep serving, and the index shows the refusal.
    pub fn load_target(
        &self,
        name: &str,
        target: LoadTarget,
    ) -> Result<Vec<Arc<LoadedModel>>, RepositoryError> {
        self.load_target_committed(name, target, &|_, _| Ok(()))
    }

    /// [`Repository::load_target`], with `commit` asked just before the loaded versions are
    /// swapped in (under the repository's lock, so nothing else changes in between): an
    /// error leaves what served before serving ([`RepositoryError::CommitRefused`]). The
    /// server writes the load's audit record there, so that no version starts serving
    /// without its record.
    pub fn load_target_committed(
        &self,
        name: &str,
        target: LoadTarget,
        commit: &CommitLoad<'_>,
    ) -> Result<Vec<Arc<LoadedModel>>, RepositoryError> {
        self.load_release_committed(name, target, None, commit)
    }

    /// [`Repository::load_target_committed`], where an operator chose `release` of the
    /// bundle's manifest for this load: it may serve even if older than the release served
    /// before ([`crate::releases`]); the choice holds for this load only (left open by a
    /// refused load, it let the poller serve that release later on its own: a red-team
    /// finding).
    pub fn load_release_committed(
        &self,
        name: &str,
        target: LoadTarget,
        release: Option<u64>,
        commit: &CommitLoad<'_>,
    ) -> Result<Vec<Arc<LoadedModel>>, RepositoryError> {
        if !valid_name(name) {
            return Err(RepositoryError::InvalidName {
                name: name.chars().take(64).collect(),
            });
        }
        let dir = self.root.join(name);
        if !dir.join(MANIFEST_FILE).is_file() {
            return Err(RepositoryError::UnknownModel {
                name: name.to_owned(),
            });
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let _pending = Pending(&self.pending);
        let _guard = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        let mut target = target;
        if target == LoadTarget::PolicyUnlessPinned {
            if self.held(name) {
                return Err(RepositoryError::Held {
                    name: name.to_owned(),
                });
            }
            // Decided here, under the load lock: a rollback that was in flight when this load
            // was asked for has set its pin by now. A pin kept across a restart counts
            // whether or not its version serves: one whose load failed at start-up (its
            // folder away for a moment, the bundle moved aside and back) is loaded as pinned
            // when its files come back, never the policy's versions (a review's finding: the
            // poller brought back the version rolled back from).
            if let Some(version) = self.pinned(name) {
                if self.serves(name, version) {
                    return Err(RepositoryError::Pinned {
                        name: name.to_owned(),
                        version,
                    });
                }
                target = LoadTarget::Version(version);
            }
        }
        let started = self.unloads.load(Ordering::SeqCst);
        // The engine steps are guarded already; this catches a panic anywhere else in the
        // load, so that it fails this model only.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.load_versions(&dir, target, release)
        }))
        .unwrap_or_else(|payload| {
            let message = panic_message(payload.as_ref());
            tracing::error!(model = name, %message, "loading the model panicked");
            Err((
                None,
                BundleError::Panicked {
                    path: dir.clone(),
                    engine: "none",
                    stage: "loading the bundle",
                    message,
                },
            ))
        });
        // Only loads and unloads change what serves, and both decide under `control`: what is
        // checked here still holds when the change is made below.
        let _control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let unloaded_since = {
            let models = self.models.read().unwrap_or_else(|p| p.into_inner());
            models.get(name).is_some_and(|e| e.unloaded_at > started)
        };
        if unloaded_since {
            tracing::warn!(
                model = name,
                "the model was unloaded while it loaded; load discarded"
            );
            return Err(RepositoryError::NotReady {
                name: name.to_owned(),
                reason: "unloaded while it was loading".into(),
            });
        }
        // The release is recorded before anything serves from it, and put back if the load
        // does not go through (the floor moved for a load that was refused: a red-team
        // finding). A ledger that cannot be written refuses the load.
        let mut recorded = None;
        let mut result = result;
        // Where the server trusts signing keys, only a manifest one of them signed moves the
        // floor: an unsigned one (served where signatures are not required) is still held
        // to it, but cannot raise it (a red-team finding: an unsigned manifest declaring
        // release 2^63 had every later signed release refused as older).
        let may_raise = |loaded: &LoadedModel| {
            self.options.signatures.trusted.is_empty() || loaded.signature.verified_key().is_some()
        };
        if let (Ok(loaded), Some(ledger)) = (&result, &self.options.releases)
            && let Some(first) = loaded.values().next()
            && may_raise(first)
        {
            match ledger.record(
                name,
                first.manifest.release,
                &first.manifest_sha256,
                release,
            ) {
                Ok(r) => recorded = Some(r),
                Err(reason) => {
                    result = Err((
                        None,
                        BundleError::ReleaseLedger {
                            path: dir.join(MANIFEST_FILE),
                            reason,
                        },
                    ));
                }
            }
        }
        let undo = |recorded: Option<crate::releases::Recorded>| {
            if let (Some(ledger), Some(r)) = (&self.options.releases, recorded)
                && let Err(e) = ledger.undo(r)
            {
                tracing::error!(model = name, error = %e, "the release ledger could not be put back");
            }
        };
        // A rollback's pin, or a plain load lifting it, is kept for a restart before anything
        // serves, as the release is: one that cannot be written refuses the load and what
        // served before serves on (a rollback answered 200 whose pin was not written served
        // the version rolled back from after a restart: a re-attack's finding). `pin_before`:
        // the pin as it was, to put back if the load is then not committed.
        let persisted = match target {
            LoadTarget::Policy => Some(None),
            LoadTarget::Version(v) => Some(Some(v)),
            LoadTarget::PolicyUnlessPinned => None,
        };
        let mut pin_before = None;
        let mut pin_unwritable = false;
        if result.is_ok()
            && let (Some(pins), Some(pin)) = (&self.options.pins, persisted)
        {
            let before = pins.pinned(name);
            match pins.set(name, pin) {
                Ok(()) => pin_before = Some(before),
                Err(reason) => {
                    pin_unwritable = true;
                    undo(recorded.take());
                    result = Err((
                        None,
                        BundleError::ReleaseLedger {
                            path: dir.join(MANIFEST_FILE),
                            reason: format!(
                                "the rollback pin could not be kept for a restart: {reason}"
                            ),
                        },
                    ));
                }
            }
        }
        let unpin = |before: Option<Option<u64>>| {
            if let (Some(pins), Some(before)) = (&self.options.pins, before)
                && let Err(e) = pins.set(name, before)
            {
                tracing::error!(model = name, error = %e, "the rollback pin could not be put back");
            }
        };
        if let Ok(loaded) = &result {
            let served: Vec<Arc<LoadedModel>> = loaded.values().cloned().collect();
            let stopping: Vec<Arc<LoadedModel>> = {
                let models = self.models.read().unwrap_or_else(|p| p.into_inner());
                models.get(name).map_or_else(Vec::new, |e| {
                    e.versions
                        .iter()
                        .filter(|(v, _)| !loaded.contains_key(v))
                        .map(|(_, m)| m.clone())
                        .collect()
                })
            };
            if let Err(reason) = commit(&served, &stopping) {
                undo(recorded);
                unpin(pin_before);
                tracing::error!(model = name, %reason, "load not committed; what served before still serves");
                return Err(RepositoryError::CommitRefused {
                    name: name.to_owned(),
                    reason,
                });
            }
        }
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let entry = models.entry(name.to_owned()).or_default();
        match result {
            Ok(loaded) => {
                let versions: Vec<u64> = loaded.keys().copied().collect();
                let served: Vec<Arc<LoadedModel>> = loaded.values().cloned().collect();
                entry.versions = loaded;
                entry.state = Some(ModelState::Ready);
                entry.refused = None;
                entry.held = false;
                entry.pinned = match target {
                    LoadTarget::Policy | LoadTarget::PolicyUnlessPinned => None,
                    LoadTarget::Version(v) => Some(v),
                };
                tracing::info!(model = name, ?versions, "model loaded");
                Ok(served)
            }
            Err((version, e)) => {
                tracing::error!(model = name, error = %e, "model failed to load");
                // The version a pin kept across restarts names stays pinned in memory when
                // it does not load (its folder away at start-up): the poller then loads it,
                // not the policy's versions, once its files are back (a review's finding:
                // the version rolled back from came back).
                if let LoadTarget::Version(v) = target
                    && self.persisted_pin(name) == Some(v)
                {
                    entry.pinned = Some(v);
                }
                // An operator's plain load lifts an unload's hold and a rollback's pin whether
                // or not it goes through: the operator asked for the bundle as it is on disk,
                // and the poller loads it once its files change (a red-team finding: a load
                // refused for a bad file left the hold, and the fixed bundle never came back).
                if target == LoadTarget::Policy && !pin_unwritable {
                    entry.held = false;
                    entry.pinned = None;
                    if let Some(pins) = &self.options.pins
                        && let Err(e) = pins.set(name, None)
                    {
                        tracing::error!(model = name, error = %e, "the lifted rollback pin could not be kept for a restart");
                    }
                }
                let e = e.relative_to(&self.root);
                // Versions already serving keep serving; the failure is reported.
                if entry.versions.is_empty() {
                    entry.state = Some(ModelState::Unavailable {
                        reason: e.to_string(),
                    });
                }
                let promotion_evidence = match &e {
                    BundleError::NotPromoted { evidence, .. } => Some(evidence.unwrap_or([0; 32])),
                    _ => None,
                };
                entry.refused = Some(Refused {
                    version,
                    reason: e.to_string(),
                    at: std::time::SystemTime::now(),
                    promotion_evidence,
                });
                Err(e.into())
            }
        }
    }

    /// Models whose last load the deployment policy refused, each with the evidence that
    /// policy read (see [`PromotionCheck`]); the poller compares it with
    /// [`Repository::promotion_evidence`].
    pub fn awaiting_promotion(&self) -> Vec<(String, [u8; 32])> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .iter()
            .filter_map(|(name, e)| {
                let evidence = e.refused.as_ref()?.promotion_evidence?;
                Some((name.clone(), evidence))
            })
            .collect()
    }

    /// The deployment policy's evidence now (`None`: no policy, or one that gives none).
    /// Reads files: call it off the async runtime.
    pub fn promotion_evidence(&self) -> Option<[u8; 32]> {
        let evidence = self.options.promotion.as_ref()?.1.as_ref()?;
        Some(evidence())
    }

    /// The version the last refused load of this model failed on, when it got that far.
    pub fn refused_version(&self, name: &str) -> Option<u64> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .get(name)
            .and_then(|e| e.refused.as_ref())
            .and_then(|r| r.version)
    }

    /// Loads running or queued behind the one running (loads run one at a time): lets a
    /// caller (or a test) see that a load it asked for is waiting, or that all are done.
    pub fn loads_pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Whether an operator's unload holds this model unloaded (see `Entry::held`).
    pub fn held(&self, name: &str) -> bool {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models.get(name).is_some_and(|e| e.held)
    }

    /// The version a rollback pinned this model to in the pins kept across restarts
    /// ([`RepositoryOptions::pins`]), if any: what start-up serves of it.
    pub fn persisted_pin(&self, name: &str) -> Option<u64> {
        self.options.pins.as_ref().and_then(|p| p.pinned(name))
    }

    /// The version a rollback pinned this model to, if any (in memory: the running server's
    /// word; a pin kept across a restart is taken into memory by the start-up load, even one
    /// that fails).
    pub fn pinned(&self, name: &str) -> Option<u64> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models.get(name).and_then(|e| e.pinned)
    }

    /// Whether `version` of `name` is serving.
    pub fn serves(&self, name: &str, version: u64) -> bool {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .get(name)
            .is_some_and(|e| e.versions.contains_key(&version))
    }

    #[allow(clippy::type_complexity)]
    fn load_versions(
        &self,
        dir: &Path,
        target: LoadTarget,
        release: Option<u64>,
    ) -> Result<BTreeMap<u64, Arc<LoadedModel>>, (Option<u64>, BundleError)> {
        // As a version folder or a bundle's file may not be a link, nor may the bundle's
        // folder (`models check` on a path given by hand follows it).
        if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err((
                None,
                BundleError::BundleLinked {
                    path: dir.to_owned(),
                },
            ));
        }
        let bundle = Bundle::open_with(dir, &self.options.signatures).map_err(|e| (None, e))?;
        if let Some(ledger) = &self.options.releases {
            ledger
                .check(&bundle.manifest.name, bundle.manifest.release, release)
                .map_err(|refusal| {
                    let path = dir.join(MANIFEST_FILE);
                    let e = match refusal {
                        crate::releases::Refusal::Older(reason) => {
                            BundleError::OlderRelease { path, reason }
                        }
                        crate::releases::Refusal::Unreadable(reason) => {
                            BundleError::ReleaseLedger { path, reason }
                        }
                    };
                    (None, e)
                })?;
        }
        let versions = match target {
            LoadTarget::Policy | LoadTarget::PolicyUnlessPinned => {
                bundle.selected_versions().map_err(|e| (e.version(), e))?
            }
            LoadTarget::Version(v) => {
                let on_disk = bundle.versions_on_disk().map_err(|e| (Some(v), e))?;
                if !on_disk.contains(&v) {
                    return Err((
                        Some(v),
                        BundleError::MissingVersion {
                            path: dir.join(v.to_string()),
                        },
                    ));
                }
                vec![v]
            }
        };
        self.check_engine_threads(&bundle, versions.len())
            .map_err(|e| (None, e))?;
        // The deployment policy judges the manifest exactly as parsed (and signed).
        let manifest_sha = self
            .options
            .promotion
            .as_ref()
            .map(|_| bundle.manifest_sha256.clone());
        let mut loaded = BTreeMap::new();
        for version in versions {
            if let (Some(check), Some(sha)) = (&self.options.promotion, &manifest_sha) {
                // Read before the policy is asked: evidence that changes after this is seen
                // as a change by the poller, whatever the policy read.
                let evidence = check.1.as_ref().map(|f| f());
                check.0(&bundle.manifest.name, version, sha).map_err(|reason| {
                    (
                        Some(version),
                        BundleError::NotPromoted {
                            path: dir.join(MANIFEST_FILE),
                            version,
                            reason,
                            evidence,
                        },
                    )
                })?;
            }
            let model = bundle
                .load_version(version, &self.options)
                .map_err(|e| (Some(version), e))?;
            loaded.insert(version, Arc::new(model));
        }
        Ok(loaded)
    }

    /// Whether serving `versions` versions of `bundle` (in place of what it serves now) keeps
    /// the repository's engine threads within `max_engine_threads`. Loads run one at a time,
    /// so the other models' count can only fall (an unload) before this load commits.
    fn check_engine_threads(&self, bundle: &Bundle, versions: usize) -> Result<(), BundleError> {
        let limit = match self.options.max_engine_threads {
            0 => DEFAULT_MAX_ENGINE_THREADS,
            n => n,
        };
        let instances = bundle.instances(&self.options);
        let asked = versions.saturating_mul(instances);
        let others: usize = {
            let models = self.models.read().unwrap_or_else(|p| p.into_inner());
            models
                .iter()
                .filter(|(name, _)| **name != bundle.manifest.name)
                .flat_map(|(_, e)| e.versions.values())
                .map(|m| instances_under(&self.options, m.manifest.batching.instances))
                .sum()
        };
        if others.saturating_add(asked) > limit {
            return Err(BundleError::EngineThreads {
                path: bundle.dir.join(MANIFEST_FILE),
                versions,
                instances,
                asked,
                others,
                limit,
            });
        }
        Ok(())
    }

    /// Stops serving a model. Requests already queued still finish. Never waits for a load in
    /// progress: a load that started before this unload discards its result.
    pub fn unload(&self, name: &str) -> Result<(), RepositoryError> {
        self.unload_committed(name, true, &|_| Ok(()))
    }

    /// [`Repository::unload`], with `commit` asked just before the model stops serving (under
    /// the repository's lock): an error leaves it serving
    /// ([`RepositoryError::CommitRefused`]). The server writes the unload's audit record there.
    /// With `hold`, the model stays unloaded through loads that honour pins (the poller's)
    /// until a plain load: an operator's unload; without it (a bundle gone from disk), a
    /// bundle that comes back is loaded again, and an operator's hold or a rollback's pin
    /// stays as it was (a red-team finding: a bundle folder moved away and back undid a
    /// recall and a rollback). Without `hold`, a model that serves nothing is unloaded
    /// without a commit: nothing stops serving.
    pub fn unload_committed(
        &self,
        name: &str,
        hold: bool,
        commit: &CommitUnload<'_>,
    ) -> Result<(), RepositoryError> {
        let on_disk = valid_name(name) && self.root.join(name).join(MANIFEST_FILE).is_file();
        let _control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let known = self
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name);
        if !on_disk && !known {
            return Err(RepositoryError::UnknownModel {
                name: name.to_owned(),
            });
        }
        let stopping: Vec<Arc<LoadedModel>> = {
            let models = self.models.read().unwrap_or_else(|p| p.into_inner());
            models
                .get(name)
                .map_or_else(Vec::new, |e| e.versions.values().cloned().collect())
        };
        // The commit (the audit record) is written without holding `models`: requests go on
        // reading what serves while it waits on the audit store.
        let committed = if !hold && stopping.is_empty() {
            Ok(())
        } else {
            commit(&stopping)
        };
        if let Err(reason) = committed {
            tracing::error!(model = name, %reason, "unload not committed; the model still serves");
            return Err(RepositoryError::CommitRefused {
                name: name.to_owned(),
                reason,
            });
        }
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let entry = models.entry(name.to_owned()).or_default();
        if let Some(newest) = entry.versions.values().next_back() {
            entry.unloaded_dicom = newest.manifest.dicom.clone();
        }
        entry.versions.clear();
        entry.state = Some(ModelState::Unloaded);
        // A rollback's pin stays, in memory as in the pins kept for a restart: the index
        // says "pinned" of an unloaded model that a restart serves at its pinned version
        // (it said "not pinned", and the restart served the pin: a review's finding). An
        // operator's plain load lifts the hold and the pin together.
        if hold {
            entry.held = true;
        }
        entry.refused = None;
        entry.unloaded_at = self.unloads.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(model = name, "model unloaded");
        Ok(())
    }

    /// A served version: the given one, or the highest when `version` is `None`.
    pub fn get(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<LoadedModel>, RepositoryError> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let entry = models
            .get(name)
            .ok_or_else(|| RepositoryError::UnknownModel {
                name: name.to_owned(),
            })?;
        let not_ready = || RepositoryError::NotReady {
            name: name.to_owned(),
            reason: match &entry.state {
                Some(ModelState::Unavailable { reason }) => reason.clone(),
                Some(ModelState::Unloaded) => "unloaded".into(),
                _ => "no version loaded".into(),
            },
        };
        match version {
            None | Some("") => entry
                .versions
                .values()
                .next_back()
                .cloned()
                .ok_or_else(not_ready),
            // A model with no version served (unloaded, or its load refused) is not ready
            // whichever version is asked for, as without one (it was 404 with a version).
            Some(_) if entry.versions.is_empty() => Err(not_ready()),
            Some(v) => parse_version(v)
                .and_then(|v| entry.versions.get(&v).cloned())
                .ok_or_else(|| RepositoryError::UnknownVersion {
                    name: name.to_owned(),
                    version: v.chars().take(32).collect(),
                }),
        }
    }

    /// The imaging models (their newest version declared `[dicom]`, returned) that serve no
    /// version now because they were unloaded (by model control, or by the poller when
    /// their folder went away), not because their load was refused, and whose folder is in
    /// the repository: a deployment may bring them back (a folder gone for good is a
    /// bundle retired).
    pub fn unloaded_imaging(&self) -> Vec<(String, crate::manifest::DicomAccepts)> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .iter()
            .filter(|(name, e)| {
                e.versions.is_empty()
                    && matches!(e.state, Some(ModelState::Unloaded))
                    && self.root.join(name.as_str()).is_dir()
            })
            .filter_map(|(name, e)| Some((name.clone(), e.unloaded_dicom.clone()?)))
            .collect()
    }

    /// Whether `name` is a bundle folder in this repository now (what a server knows of a
    /// folder gone outlives it only until a restart: a series was given a job for it, or
    /// not, by whether the server had restarted, a re-attack's finding).
    pub fn knows(&self, name: &str) -> bool {
        crate::manifest::valid_name(name) && self.root.join(name).is_dir()
    }

    /// Every version being served.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        models
            .values()
            .flat_map(|e| e.versions.values().cloned())
            .collect()
    }

    /// Every model on disk or known, with its versions and state; a refused load of a model
    /// whose older versions still serve is a row of its own.
    pub fn index(&self) -> Vec<IndexEntry> {
        let on_disk = self.scan().unwrap_or_default();
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<&str> = on_disk.iter().map(String::as_str).collect();
        names.extend(models.keys().map(String::as_str));
        names.sort_unstable();
        names.dedup();
        let row = |name: &str, state: ModelState| IndexEntry {
            name: name.to_owned(),
            version: None,
            state,
            backend: None,
            signature: None,
            selftest: None,
            at: None,
            pinned: false,
        };
        let mut out = vec![];
        for name in names {
            match models.get(name) {
                Some(entry) if !entry.versions.is_empty() => {
                    out.extend(entry.versions.iter().map(|(&v, m)| IndexEntry {
                        version: Some(v),
                        backend: Some(m.worker.backend()),
                        signature: Some(m.signature.clone()),
                        selftest: m.selftest.as_ref().map(ToString::to_string),
                        at: Some(m.loaded_at),
                        pinned: entry.pinned == Some(v),
                        ..row(name, ModelState::Ready)
                    }));
                    if let Some(refused) = &entry.refused {
                        out.push(IndexEntry {
                            version: refused.version,
                            at: Some(refused.at),
                            pinned: entry.pinned.is_some() && entry.pinned == refused.version,
                            ..row(
                                name,
                                ModelState::Unavailable {
                                    reason: refused.reason.clone(),
                                },
                            )
                        });
                    }
                }
                Some(entry) => out.push(IndexEntry {
                    version: entry.refused.as_ref().and_then(|r| r.version),
                    at: entry.refused.as_ref().map(|r| r.at),
                    // A pinned model whose pinned version is not serving says so (an
                    // unavailable one said nothing of the pin that keeps it so: a review's
                    // finding).
                    pinned: entry.pinned.is_some(),
                    ..row(name, entry.state.clone().unwrap_or(ModelState::Unloaded))
                }),
                None => out.push(row(name, ModelState::Unloaded)),
            }
        }
        out
    }

    /// A fingerprint of each bundle folder under the root: its manifest's and signature's
    /// bytes and, for every file below it, its path, size and modification time. Two equal
    /// fingerprints mean nothing a load reads has changed (the repository poller compares
    /// them). Unreadable entries count as changes, never as errors.
    pub fn fingerprints(&self) -> BTreeMap<String, [u8; 32]> {
        use sha2::{Digest, Sha256};
        let mut out = BTreeMap::new();
        for name in self.scan().unwrap_or_default() {
            let dir = self.root.join(&name);
            let mut hash = Sha256::new();
            for file in [MANIFEST_FILE, signature::SIGNATURE_FILE] {
                // Opened as a load opens them: a FIFO here must not block the poller.
                let bytes = open_regular(&dir.join(file)).and_then(|f| {
                    let mut bytes = vec![];
                    f.take(MANIFEST_LIMIT + 1)
                        .read_to_end(&mut bytes)
                        .map_err(NotRegular::Io)?;
                    Ok(bytes)
                });
                match bytes {
                    Ok(b) => {
                        hash.update((b.len() as u64).to_le_bytes());
                        hash.update(&b);
                    }
                    Err(NotRegular::Io(e)) => {
                        hash.update(format!("{file}: {:?}", e.kind()).as_bytes())
                    }
                    Err(NotRegular::Kind) => hash.update(format!("{file}: not regular").as_bytes()),
                }
            }
            fingerprint_tree(&dir, &dir, 0, &mut hash);
            out.insert(name, hash.finalize().into());
        }
        out
    }
}

/// Adds every file below `dir` (path, size, modification time) to `hash`, in name order.
fn fingerprint_tree(root: &Path, dir: &Path, depth: usize, hash: &mut sha2::Sha256) {
    use sha2::Digest;
    // The version folders are at depth 1 of the bundle's folder: their deepest files, and
    // the folder a load refuses as too deep, are watched.
    if depth > crate::checksum::MAX_FOLDER_DEPTH + 2 {
        return;
    }
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(Result::ok).collect(),
        Err(e) => {
            hash.update(format!("{}: {:?}", dir.display(), e.kind()).as_bytes());
            return;
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let relative = path.strip_prefix(root).unwrap_or(&path);
        hash.update(relative.to_string_lossy().as_bytes());
        if meta.is_dir() {
            hash.update(b"/");
            fingerprint_tree(root, &path, depth + 1, hash);
        } else {
            hash.update(meta.len().to_le_bytes());
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            hash.update(modified.to_le_bytes());
            // Permissions, owner and inode too (their change time): a `chmod` that makes an
            // unreadable model file readable changes no modification time, and a version
            // refused for it was never loaded again (a red-team finding).
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt as _;
                for n in [
                    meta.ctime(),
                    meta.ctime_nsec(),
                    i64::from(meta.mode()),
                    meta.ino() as i64,
                ] {
                    hash.update(n.to_le_bytes());
                }
            }
        }
    }
}

/// Writes `bytes` to `path` (in the folder `dir`) atomically, readable as a plain create
/// makes it (0666 less the umask: the signature is read by the server, which may run as
/// another user). See [`crate::write_atomic`].
fn write_atomic_in(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    crate::write_atomic(dir, path, bytes, 0o666).map_err(|(at, e)| BundleError::io(&at, e))
}
