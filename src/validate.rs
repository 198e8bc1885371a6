//! `nightingale validate` (issue 11): a bundle over a labelled dataset through the same
//! repository, workers, engine and audit trail as serving, then the report and the gate.
//!
//! Exit codes: 0 every gate criterion passes (or the bundle declares none), 1 a criterion
//! fails (each is named), 2 a usage or data error.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use nightingale_inference::{BackendKind, InferenceError, NamedTensor, Tensor};
use nightingale_models::{
    LoadTarget, LoadedModel, Manifest, Repository, RepositoryOptions, SignaturePolicy,
};
use nightingale_validation::bootstrap::BootstrapSpec;
use nightingale_validation::dataset::{
    Columns, CsvDataset, DatasetError, LabelSpec, NpyDataset, in_folder,
};
use nightingale_validation::report::{
    self, DatasetSection, ModelIdentity, NamedThreshold, Report, Scored, Settings,
};
use nightingale_validation::{DatasetSummary, Row};
use nightingale_validation::{Unusable, check_gate, check_gate_multiclass, html, multiclass};

use crate::audit::{AuditEvent, AuditLog, EventKind, Outcome, tensors_sha256};
use crate::config::BackendArg;

/// Unusable rows listed in the report (all are counted).
const LISTED_UNUSABLE: usize = 1000;

/// `nightingale validate`.
#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// Model repository folder.
    #[arg(long, env = "NIGHTINGALE_REPOSITORY", default_value = "models/bundles")]
    pub repository: PathBuf,
    /// The bundle, as NAME or NAME@VERSION (default: its highest version the policy serves).
    /// With --predictions it supplies the labels, thresholds and gate.
    #[arg(long, required_unless_present_any = ["predictions", "compare"])]
    pub model: Option<String>,
    /// Two versions on the same rows, NAME@V1,NAME@V2: the report is V2's, with DeLong's test
    /// of the AUROC difference (V2 − V1) and V2's gate.
    #[arg(long, conflicts_with_all = ["model", "predictions"])]
    pub compare: Option<String>,
    /// Labelled dataset: a CSV with the bundle's feature names as columns and a label column;
    /// a folder with images.npy (preprocessed model inputs) and labels.npy (class indices); or
    /// a folder with manifest.csv naming DICOM files (`file`, the label column).
    #[arg(long, required_unless_present = "predictions")]
    pub dataset: Option<PathBuf>,
    /// The output to evaluate [default: the output with a positive_label (binary), else the
    /// first with class labels (multi-class, one-vs-rest)].
    #[arg(long)]
    pub output: Option<String>,
    /// Evaluate predictions made elsewhere: a CSV with a label column and a score column.
    #[arg(long, conflicts_with = "dataset")]
    pub predictions: Option<PathBuf>,
    /// Where report.json and report.html are written (created).
    #[arg(long, default_value = "validation-report")]
    pub out: PathBuf,
    /// The label column: 0/1 (1 = the bundle's positive label) or class names.
    #[arg(long, default_value = "label")]
    pub label_column: String,
    /// The score column of a --predictions file (the positive class's probability).
    #[arg(long, default_value = "score")]
    pub score_column: String,
    /// A multi-class --predictions file's probability columns, one per class in the output's
    /// label order [default: score_<label> for each label].
    #[arg(long, value_delimiter = ',')]
    pub score_columns: Vec<String>,
    /// A column whose values define subgroups (repeatable, or comma-separated).
    #[arg(long = "subgroup", value_delimiter = ',')]
    pub subgroups: Vec<String>,
    /// Patient (cluster) id column: bootstrap resamples patients, not rows.
    #[arg(long)]
    pub patient_id_column: Option<String>,
    /// Bootstrap replicates (0: none).
    #[arg(long, default_value_t = 2000)]
    pub bootstrap: usize,
    #[arg(long, default_value_t = 20_261_202)]
    pub seed: u64,
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f64,
    /// Subgroups with fewer rows are reported as insufficient.
    #[arg(long, default_value_t = 30)]
    pub min_subgroup_n: usize,
    #[arg(long, default_value_t = 10)]
    pub calibration_bins: usize,
    /// Operating points chosen on the dataset for these sensitivities.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.95")]
    pub target_sensitivity: Vec<f64>,
    /// Operating points chosen on the dataset for these specificities.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.95")]
    pub target_specificity: Vec<f64>,
    /// The engine for bundles whose backend is `any`.
    #[arg(long, value_enum, default_value = "tract")]
    pub backend: BackendArg,
    /// ONNX Runtime shared library (ort backend).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,
    /// Working memory one run of the model may use on tract, in bytes (as `serve
    /// --max-inference-bytes`): a batch over it is split in halves until it fits.
    #[arg(long, default_value_t = nightingale_inference::DEFAULT_MAX_WORKING_BYTES,
          value_parser = clap::value_parser!(u64).range(1 << 20..))]
    pub max_inference_bytes: u64,
    /// A minisign public key trusted to sign bundles (repeatable).
    #[arg(long = "trusted-key", value_delimiter = ',')]
    pub trusted_keys: Vec<PathBuf>,
    /// Refuse bundles that are unsigned or signed by an untrusted key.
    #[arg(long)]
    pub require_signatures: bool,
    /// The JSON-lines audit trail of this run's predictions [default: <out>/audit.jsonl]. Its
    /// own hash chain: never a file a running server appends to.
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// No progress output, and log lines at warning level and above only (NIGHTINGALE_LOG
    /// still sets the level).
    #[arg(long)]
    pub quiet: bool,
}

/// What a caller other than the command line supplies (the server's validation runs).
#[derive(Default)]
pub struct RunContext {
    /// How to load the bundle (the server's engine and signature policy) instead of the
    /// flags'.
    pub options: Option<RepositoryOptions>,
    /// The audit trail to record predictions in (the server's) instead of `--audit-log`.
    pub audit: Option<AuditLog>,
    /// Counters a watcher reads while the run goes.
    pub progress: Option<Arc<RunProgress>>,
    /// Who asked, for the audit records (default `validate`).
    pub actor: Option<String>,
    /// How the report names the dataset instead of its path (the server's runs: the name the
    /// caller gave, not where the server keeps it).
    pub dataset_label: Option<String>,
    /// The dataset was uploaded by the caller (the report's `dataset.origin` is `upload`: the
    /// deployment gate does not count it).
    pub uploaded: bool,
    /// The run was asked for over HTTP by a caller without the admin role (the report's
    /// `dataset.origin` is `researcher`: the deployment gate does not count it, since its
    /// options — label, output, patient-id column, replicates — are the caller's: a run
    /// made to fail withdrew an operator's pass, a red-team finding).
    pub researcher: bool,
    /// The run's identifier (a server's run: its id in `/validation/runs/{id}`); a new UUID
    /// when None.
    pub run_id: Option<String>,
    /// The dataset's path was checked, canonical, under the server's validation root when the
    /// run was asked for: it must be that very path still. A link swapped in its place (or
    /// along it) after the check had the run read a file outside the root (a review's
    /// finding); the run then fails, and every file of it is opened with no link followed.
    pub confined: bool,
}

/// How far a run has read its dataset.
#[derive(Debug, Default)]
pub struct RunProgress {
    pub rows: std::sync::atomic::AtomicU64,
    pub bytes_read: std::sync::atomic::AtomicU64,
    pub total_bytes: std::sync::atomic::AtomicU64,
    /// Set to stop the run at its next row, or its bootstrap's next replicate
    /// (`DELETE /validation/runs/{id}`, the server's time limit).
    pub cancelled: Arc<std::sync::atomic::AtomicBool>,
}

/// `nightingale validate`'s flags parsed from an argument list (the server builds its runs
/// with the same parser, so they get the same defaults and checks).
#[derive(clap::Parser, Debug)]
#[command(name = "validate")]
pub struct ValidateCommand {
    #[command(flatten)]
    pub args: ValidateArgs,
}

/// Runs `validate`; returns the process exit code.
pub fn run(args: &ValidateArgs) -> i32 {
    match execute(args) {
        Ok(passed) => {
            if passed {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

pub(crate) fn settings(args: &ValidateArgs) -> anyhow::Result<Settings> {
    if !(args.confidence > 0.5 && args.confidence < 1.0) {
        bail!("--confidence must be in (0.5, 1)");
    }
    for t in args
        .target_sensitivity
        .iter()
        .chain(&args.target_specificity)
    {
        if !(*t > 0.0 && *t <= 1.0) {
            bail!("target sensitivities and specificities must be in (0, 1]");
        }
    }
    if args.calibration_bins == 0 || args.calibration_bins > 1000 {
        bail!("--calibration-bins must be 1 to 1000");
    }
    if args.bootstrap > 1_000_000 {
        bail!("--bootstrap must be at most 1,000,000");
    }
    if args.subgroups.len() > MAX_SUBGROUP_COLUMNS {
        bail!("at most {MAX_SUBGROUP_COLUMNS} subgroup columns");
    }
    for (k, c) in args.subgroups.iter().enumerate() {
        if args.subgroups[..k].contains(c) {
            bail!("subgroup column {:?} is named twice", clip(c));
        }
    }
    Ok(Settings {
        confidence: args.confidence,
        bootstrap_replicates: args.bootstrap,
        seed: args.seed,
        min_subgroup_n: args.min_subgroup_n,
        calibration_bins: args.calibration_bins,
        target_sensitivities: args.target_sensitivity.clone(),
        target_specificities: args.target_specificity.clone(),
        ..Settings::default()
    })
}

/// Most `--subgroup` columns one run analyses.
pub const MAX_SUBGROUP_COLUMNS: usize = 16;

/// A name as quoted in an error: at most 64 characters.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// NAME or NAME@VERSION.
pub(crate) fn parse_model(s: &str) -> anyhow::Result<(String, Option<u64>)> {
    match s.split_once('@') {
        None => Ok((s.to_owned(), None)),
        Some((name, v)) => {
            let v: u64 =
                v.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                    anyhow!("{s:?}: the version after @ must be a positive integer")
                })?;
            Ok((name.to_owned(), Some(v)))
        }
    }
}

/// What is scored: the output, and for a binary output its positive label's column and the
/// thresholds on it; a multi-class output's every column.
#[derive(Clone)]
struct Target {
    output: String,
    /// Binary: the positive label's column.
    column: usize,
    /// Columns of the output (K).
    width: usize,
    labels: LabelSpec,
    thresholds: Vec<NamedThreshold>,
}

impl Target {
    fn multiclass(&self) -> bool {
        self.labels.multiclass
    }
}

fn scored_output(m: &Manifest, wanted: Option<&str>) -> anyhow::Result<Target> {
    let output = match wanted {
        Some(w) => m
            .outputs
            .iter()
            .find(|o| o.name == w)
            .ok_or_else(|| anyhow!("bundle {:?} has no output {w:?}", m.name))?,
        None => m
            .outputs
            .iter()
            .find(|o| o.positive_label.is_some())
            .or_else(|| m.outputs.iter().find(|o| o.labels.len() > 2))
            .ok_or_else(|| {
                anyhow!(
                    "bundle {:?} declares no output with a positive_label or class labels: \
                     there is nothing `validate` can score",
                    m.name
                )
            })?,
    };
    if output.labels.len() < 2 {
        bail!(
            "output {:?} of {:?} declares no class labels",
            output.name,
            m.name
        );
    }
    let Some(positive) = output.positive_label.clone() else {
        return Ok(Target {
            output: output.name.clone(),
            column: 0,
            width: output.labels.len(),
            labels: LabelSpec {
                positive: String::new(),
                classes: output.labels.clone(),
                multiclass: true,
            },
            thresholds: Vec::new(),
        });
    };
    let column = output
        .labels
        .iter()
        .position(|l| *l == positive)
        .ok_or_else(|| anyhow!("positive_label {positive:?} is not among the labels"))?;
    let thresholds = m
        .thresholds
        .iter()
        .filter(|t| t.output == output.name && t.label.as_ref().is_none_or(|l| *l == positive))
        .map(|t| NamedThreshold {
            name: t.name.clone(),
            value: t.value,
            description: t.description.clone(),
        })
        .collect();
    Ok(Target {
        output: output.name.clone(),
        column,
        width: output.labels.len(),
        labels: LabelSpec {
            positive,
            classes: output.labels.clone(),
            multiclass: false,
        },
        thresholds,
    })
}

struct Loaded {
    model: Arc<LoadedModel>,
    identity: ModelIdentity,
    /// The output scored and how.
    target: Target,
}

fn load(
    repository: &Repository,
    args: &ValidateArgs,
    name: &str,
    version: Option<u64>,
) -> anyhow::Result<Loaded> {
    let target = match version {
        Some(v) => LoadTarget::Version(v),
        None => LoadTarget::Policy,
    };
    repository
        .load_target(name, target)
        .with_context(|| format!("cannot load {name}"))?;
    let model = repository
        .get(name, version.map(|v| v.to_string()).as_deref())
        .with_context(|| format!("{name} is not serving"))?;
    let t = scored_output(&model.manifest, args.output.as_deref())?;
    let identity = ModelIdentity {
        name: model.name.clone(),
        version: model.version,
        // The manifest the load parsed and checked, not the file read again: one replaced
        // between the two reads got a passing report under the other's digest, and
        // `--require-validation` served the manifest whose own gate failed (a red-team
        // finding).
        manifest_sha256: model.manifest_sha256.clone(),
        model_sha256: model.model_sha256.clone(),
        signature_key_id: match &model.signature {
            nightingale_models::SignatureStatus::Unsigned => None,
            nightingale_models::SignatureStatus::Verified { key_id, .. }
            | nightingale_models::SignatureStatus::UntrustedKey { key_id } => Some(key_id.clone()),
        },
        backend: Some(model.worker.backend().to_owned()),
        output: t.output.clone(),
        positive_label: t.labels.positive.clone(),
    };
    Ok(Loaded {
        model,
        identity,
        target: t,
    })
}

/// The model's single input: its name, declared shape and feature names (tabular).
struct Input {
    name: String,
    shape: Vec<i64>,
    features: Vec<String>,
}

fn model_input(m: &Manifest, tensors: bool) -> anyhow::Result<Input> {
    let [input] = m.inputs.as_slice() else {
        bail!(
            "bundle {:?} has {} inputs; `validate` runs bundles with one",
            m.name,
            m.inputs.len()
        );
    };
    if input.datatype != nightingale_inference::DataType::Fp32 {
        bail!(
            "input {:?} is {}, not FP32",
            input.name,
            input.datatype.as_str()
        );
    }
    if !tensors {
        if m.preprocessing.is_some() {
            bail!(
                "bundle {:?} takes images: give a folder with images.npy and labels.npy, \
                 or one with manifest.csv naming DICOM files, or --predictions",
                m.name
            );
        }
        if input.features.is_empty() {
            bail!(
                "input {:?} of {:?} names no [[inputs.features]]: the dataset's columns \
                 cannot be matched to it",
                input.name,
                m.name
            );
        }
    }
    Ok(Input {
        name: input.name.clone(),
        shape: input.shape.clone(),
        features: input.features.iter().map(|f| f.name.clone()).collect(),
    })
}

pub use nightingale_validation::dataset::{PathRefused, path_in, path_under};

/// An image dataset: a folder with `manifest.csv` naming DICOM files under it (a `file`
/// column, the label column, optional subgroup and patient-id columns). Each file is decoded
/// and preprocessed as the imaging pipeline does (`nightingale_dicom::pixels` with its
/// limits, grey, then the bundle's `[preprocessing]`); each file is one row (a single-frame
/// image: multi-frame files are refused), with its label. A file that cannot be read, decoded or preprocessed makes its row unusable, with
/// the reason.
struct DicomDataset {
    manifest: CsvDataset,
    /// The folder, canonical.
    dir: PathBuf,
    pre: nightingale_models::Preprocessing,
    /// What the bundle's `[dicom]` section takes (the router's own check): a file the
    /// pipeline would never send the bundle is no row of its validation.
    accepts: Option<crate::pipeline::route::Match>,
    limits: nightingale_dicom::pixels::Limits,
    pending: VecDeque<Row>,
    /// (path relative to the folder, SHA-256) of each file read, in manifest order.
    files: Vec<(String, String)>,
    /// The row that first named each file (device, inode) and each content (SHA-256): a
    /// file named again, under its name or another, is the same image, not another row.
    seen_files: std::collections::HashMap<(u64, u64), u64>,
    seen_contents: std::collections::HashMap<String, u64>,
    /// ... and each SOP Instance UID: one instance re-encoded, or with a byte changed in a
    /// private tag, is still one image (a re-attack: 16 instances counted as 80 rows).
    seen_instances: std::collections::HashMap<String, u64>,
    /// ... and each preprocessed image with its label, as a tensor dataset's: copies of one
    /// image under new SOP Instance UIDs, or re-encoded, counted as rows of their own (a
    /// review's finding: six images saved five times each met a minimum of 10 positives).
    seen_images: nightingale_validation::dataset::SeenRows,
    bytes: u64,
}

/// A dataset file opened once, for what follows to read the very file that was checked: a
/// path swapped meanwhile for a link out of the folder or a FIFO (a review's finding: a file
/// outside the folder was read and a run blocked for good) is refused at the open, and the
/// readers reopen the open file itself through `/proc/self/fd` rather than the name.
struct OpenedFile {
    file: std::fs::File,
    len: u64,
    identity: (u64, u64),
}

impl OpenedFile {
    /// `full` (canonical, so holding no link) opened with no link followed anywhere along
    /// it (`openat2` RESOLVE_NO_SYMLINKS; `O_NOFOLLOW` on the last component where the
    /// kernel lacks openat2), without blocking, then checked to be a regular file.
    fn open(full: &Path) -> Result<OpenedFile, String> {
        let fd =
            nightingale_validation::dataset::open_without_links(full).map_err(|e| match e {
                rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
                    "the file is outside the dataset folder".to_owned()
                }
                rustix::io::Errno::NOENT => "the file is missing".to_owned(),
                _ => "the file cannot be read".to_owned(),
            })?;
        let file = std::fs::File::from(fd);
        let meta = file
            .metadata()
            .map_err(|_| "the file cannot be read".to_owned())?;
        if !meta.is_file() || meta.len() > MAX_DICOM_FILE_BYTES {
            return Err(format!(
                "not a regular file of at most {MAX_DICOM_FILE_BYTES} bytes"
            ));
        }
        use std::os::unix::fs::MetadataExt as _;
        Ok(OpenedFile {
            file,
            len: meta.len(),
            identity: (meta.dev(), meta.ino()),
        })
    }

    /// A name that opens this very file again (its descriptor under `/proc/self/fd`), for
    /// the readers that take a path; `full` (the name checked) where `/proc` is not mounted
    /// (every row was refused without it: a re-attack's finding), said once in the log.
    fn path(&self, full: &Path) -> PathBuf {
        use std::os::fd::AsRawFd as _;
        static PROC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let proc = *PROC.get_or_init(|| {
            let mounted = Path::new("/proc/self/fd").is_dir();
            if !mounted {
                tracing::warn!(
                    "/proc is not mounted: DICOM dataset files are decoded by their names, after the check that they are in the folder"
                );
            }
            mounted
        });
        if proc {
            PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
        } else {
            full.to_owned()
        }
    }

    /// SHA-256 (hex) of the open file, read from its start.
    fn sha256(&self) -> std::io::Result<String> {
        nightingale_models::sha256_reader(&self.file)
    }
}

/// The largest DICOM file a dataset row may name.
const MAX_DICOM_FILE_BYTES: u64 = 2 << 30;

impl DicomDataset {
    fn is_dicom_folder(dir: &Path) -> bool {
        dir.join("manifest.csv").is_file()
    }

    fn open(
        dir: &Path,
        columns: &Columns,
        labels: LabelSpec,
        pre: nightingale_models::Preprocessing,
        accepts: Option<nightingale_models::manifest::DicomAccepts>,
    ) -> anyhow::Result<DicomDataset> {
        let manifest = CsvDataset::open(&in_folder(dir, "manifest.csv")?, columns, labels)?;
        Ok(DicomDataset {
            manifest,
            // Canonical already (the run's dataset path): not resolved again, which would
            // follow a link swapped in for the folder.
            dir: dir.to_owned(),
            pre,
            accepts: accepts
                .as_ref()
                .map(crate::pipeline::route::Match::of_bundle),
            limits: nightingale_dicom::pixels::Limits::default(),
            pending: VecDeque::new(),
            files: Vec::new(),
            seen_files: Default::default(),
            seen_contents: Default::default(),
            seen_instances: Default::default(),
            seen_images: Default::default(),
            bytes: 0,
        })
    }

    fn next_row(&mut self) -> Result<Option<Result<Row, Unusable>>, DatasetError> {
        if let Some(r) = self.pending.pop_front() {
            return Ok(Some(Ok(r)));
        }
        let r = match self.manifest.next_row()? {
            None => return Ok(None),
            Some(Err(u)) => return Ok(Some(Err(u))),
            Some(Ok(r)) => r,
        };
        let rel = r.file.clone().unwrap_or_default();
        match self.decode(&rel, r.row) {
            Ok(frames) => {
                for features in &frames {
                    let mut key: Vec<u8> = features
                        .iter()
                        .flat_map(|v| (v + 0.0).to_bits().to_le_bytes())
                        .collect();
                    key.extend_from_slice(&(r.class as u64).to_le_bytes());
                    if let Some(first) = self.seen_images.repeated(r.row, &key) {
                        return Ok(Some(Err(Unusable {
                            row: r.row,
                            reason: nightingale_validation::dataset::repeated_reason(
                                first,
                                "image (after preprocessing) and label",
                            ),
                        })));
                    }
                }
                for features in frames {
                    self.pending.push_back(Row {
                        features,
                        file: None,
                        ..r.clone()
                    });
                }
                Ok(self.pending.pop_front().map(Ok))
            }
            Err(reason) => Ok(Some(Err(Unusable { row: r.row, reason }))),
        }
    }

    /// The preprocessed frames of the file row `row` names.
    fn decode(&mut self, rel: &str, row: u64) -> Result<Vec<Vec<f32>>, String> {
        use nightingale_dicom::pixels::{Colour, DecodeOptions, PixelSource};
        let full = path_in(&self.dir, rel).map_err(|e| match e {
            PathRefused::Missing => "the file is missing".to_owned(),
            // `..` or a leading `/` leaves the folder; `./x` does not, but is not plain either
            // (it was called "outside": a review's finding).
            PathRefused::NotRelative
                if std::path::Path::new(rel).components().any(|c| {
                    matches!(
                        c,
                        std::path::Component::ParentDir
                            | std::path::Component::RootDir
                            | std::path::Component::Prefix(_)
                    )
                }) =>
            {
                "the file is outside the dataset folder (a path with .. or a leading /)".to_owned()
            }
            PathRefused::NotRelative => {
                "not a plain relative path in the dataset folder (no . segment, no empty name)"
                    .to_owned()
            }
            _ => "the file is outside the dataset folder, or a link leads to it".to_owned(),
        })?;
        let opened = OpenedFile::open(&full)?;
        // One image is one row: the same file or the same bytes named again met the gate's
        // minimum sample and narrowed its intervals (a review's finding: six files named
        // twenty times each passed a gate that the six alone fail).
        if let Some(first) = self.seen_files.get(&opened.identity) {
            return Err(format!(
                "the same file as row {first}: an image counts once"
            ));
        }
        self.seen_files.insert(opened.identity, row);
        let sha256 = opened
            .sha256()
            .map_err(|_| "the file cannot be read".to_owned())?;
        let full = opened.path(&full);
        if let Some(first) = self.seen_contents.get(&sha256) {
            return Err(format!(
                "the same bytes as the file of row {first}: an image counts once"
            ));
        }
        self.seen_contents.insert(sha256.clone(), row);
        self.files.push((rel.to_owned(), sha256));
        self.bytes += opened.len;
        // Before any pixel is decoded. A review's findings: every frame of a multi-frame
        // file was a row of its own, so one 10-frame file met a minimum of 10 negatives (its
        // frames are one image's, not independent rows), and a 4,096-frame file of 18 KB
        // held 930 MB of preprocessed frames; and files the bundle's `[dicom]` section does
        // not take (a US colour image for a CR/DX/CT/MR bundle) were scored as rows.
        let header = nightingale_dicom::series::SeriesHeader::read(&full)
            .map_err(|_| "not a readable DICOM file".to_owned())?;
        // Counted once used: a copy refused (cut short, a syntax not decoded) leaves the place
        // to a good copy after it (a re-attack's finding: both were lost).
        // An object without its own UID is no instance a PACS could send (the spool refuses
        // it), and copies of it could not be told apart (a review's finding).
        if header.sop_instance_uid.trim().is_empty() {
            return Err(
                "no SOP Instance UID: not an image instance (the DICOM node refuses it)".to_owned(),
            );
        }
        if let Some(first) = self.seen_instances.get(&header.sop_instance_uid) {
            return Err(format!(
                "the same instance (SOP Instance UID) as row {first}: an image counts once"
            ));
        }
        if header.frames > 1 {
            return Err(format!(
                "{} frames: a row of a DICOM dataset is one single-frame image (the frames of one file are not independent rows; multi-frame files are not validated)",
                header.frames
            ));
        }
        if let Some(reason) = self.accepts.as_ref().and_then(|m| m.mismatch(&header, "")) {
            return Err(format!(
                "the bundle's [dicom] section does not take it ({reason}): the pipeline would never send it to this model"
            ));
        }
        let source = PixelSource::open(&full, &self.limits).map_err(|e| e.to_string())?;
        source
            .refuse_modality_lut_sequence()
            .map_err(|e| e.to_string())?;
        let options = DecodeOptions {
            colour: Colour::Grey,
            limits: self.limits.clone(),
            ..DecodeOptions::default()
        };
        let mut out = Vec::new();
        for frame in source.frames(&options) {
            let frame = frame.map_err(|e| e.to_string())?;
            // As the pipeline leaves it out (it would not make a finding of it).
            use crate::pipeline::process::{MIN_FRAME_SIDE, NOISE_CORRELATION, NoPicture};
            match crate::pipeline::process::no_picture(&frame) {
                Some(NoPicture::Blank) => {
                    return Err(format!(
                        "one pixel value only, or nearly, or under {MIN_FRAME_SIDE} pixels on a side (a blank image): the pipeline makes no finding of it"
                    ));
                }
                Some(NoPicture::Noise) => {
                    return Err(format!(
                        "reads as noise (neighbouring pixels uncorrelated, r < {NOISE_CORRELATION}): the pipeline makes no finding of it"
                    ));
                }
                None => {}
            }
            let image = nightingale_models::Image {
                rows: frame.rows,
                cols: frame.cols,
                samples: frame.samples,
                data: &frame.data,
                slope: frame.slope,
                intercept: frame.intercept,
                monochrome1: frame.monochrome1,
            };
            out.push(self.pre.apply_to_vec(&image).map_err(|e| e.to_string())?);
        }
        if out.is_empty() {
            return Err("no frame was decoded".to_owned());
        }
        self.seen_instances.insert(header.sop_instance_uid, row);
        Ok(out)
    }

    fn bytes_read(&self) -> u64 {
        self.manifest.bytes_read()
    }

    /// `sha256` is that of the `sha256sum`-style listing of manifest.csv and every file read,
    /// in manifest order; each file's own is in `files`.
    fn finish(self) -> Result<DatasetSummary, DatasetError> {
        let mut summary = self.manifest.finish()?;
        let mut listing = format!("{}  manifest.csv\n", summary.sha256);
        summary
            .files
            .insert("manifest.csv".to_owned(), summary.sha256.clone());
        for (name, sha) in self.files {
            listing.push_str(&format!("{sha}  {name}\n"));
            summary.files.insert(name, sha);
        }
        summary.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(listing.as_bytes()));
        summary.path = self.dir.display().to_string();
        summary.bytes += self.bytes;
        Ok(summary)
    }
}

/// The dataset being read.
enum Data {
    Csv(Box<CsvDataset>),
    Npy(Box<NpyDataset>),
    Dicom(Box<DicomDataset>),
}

impl Data {
    fn next_row(&mut self) -> Result<Option<Result<Row, Unusable>>, DatasetError> {
        match self {
            Data::Csv(d) => d.next_row(),
            Data::Npy(d) => d.next_row(),
            Data::Dicom(d) => d.next_row(),
        }
    }
    fn bytes_read(&self) -> u64 {
        match self {
            Data::Csv(d) => d.bytes_read(),
            Data::Npy(d) => d.bytes_read(),
            Data::Dicom(d) => d.bytes_read(),
        }
    }
    fn finish(self) -> Result<DatasetSummary, DatasetError> {
        match self {
            Data::Csv(d) => (*d).finish(),
            Data::Npy(d) => Ok((*d).finish()),
            Data::Dicom(d) => d.finish(),
        }
    }
}

/// Progress on a terminal (a bar) or in a log (a line every 10 %).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    next_line: u64,
    quiet: bool,
    started: Instant,
    shared: Option<Arc<RunProgress>>,
}

impl Progress {
    fn new(total_bytes: u64, quiet: bool, shared: Option<Arc<RunProgress>>) -> Progress {
        if let Some(s) = &shared {
            s.total_bytes
                .store(total_bytes, std::sync::atomic::Ordering::Relaxed);
        }
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total_bytes);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg} (ETA {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Progress {
            bar,
            total: total_bytes.max(1),
            next_line: 10,
            quiet,
            started: Instant::now(),
            shared,
        }
    }

    /// Records how far the run is; an error when the run has been cancelled.
    fn update(&mut self, bytes: u64, rows: usize) -> anyhow::Result<()> {
        if let Some(s) = &self.shared {
            use std::sync::atomic::Ordering::Relaxed;
            s.bytes_read.store(bytes, Relaxed);
            s.rows.store(rows as u64, Relaxed);
            if s.cancelled.load(Relaxed) {
                bail!("the run was cancelled");
            }
        }
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
            bar.set_message(format!("{rows} rows"));
        } else if !self.quiet {
            let pct = bytes.saturating_mul(100) / self.total;
            if pct >= self.next_line {
                let secs = self.started.elapsed().as_secs_f64().max(1e-9);
                eprintln!(
                    "validate: {pct}% of the dataset, {rows} rows, {:.0} rows/s",
                    rows as f64 / secs
                );
                self.next_line = (pct / 10 + 1) * 10;
            }
        }
        Ok(())
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The scored rows of one run.
#[derive(Default)]
struct Collected {
    y: Vec<bool>,
    /// Class indices (multi-class).
    classes: Vec<usize>,
    /// One score vector per model (two with --compare).
    p: Vec<Vec<f64>>,
    /// Each subgroup column's value per row (interned; a column with too many or too long
    /// values stops and is reported as not analysed).
    subgroups: Vec<report::SubgroupColumn>,
    clusters: Vec<String>,
    unusable: Vec<Unusable>,
    unusable_count: usize,
}

/// A batch in flight: its rows' scores, per model.
type InFlight = tokio::task::JoinHandle<anyhow::Result<Vec<Vec<f64>>>>;

/// Scores one batch with each model: per model, the scored columns of each row, row after
/// row (binary: the positive label's probability; multi-class: all K).
async fn score_batch(
    models: Vec<(Arc<LoadedModel>, Target)>,
    audit: AuditLog,
    actor: String,
    input: String,
    row_shape: Vec<usize>,
    rows: Vec<Vec<f32>>,
    request_id: String,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let n = rows.len();
    let width: usize = row_shape.iter().product();
    let values: Vec<f32> = rows.into_iter().flatten().collect();
    let mut out = Vec::with_capacity(models.len());
    for (model, t) in models {
        let mut scores = Vec::with_capacity(n * t.width.max(1));
        // Rows [start, end) still to score, in order. A batch the model refuses for working
        // memory (`--max-inference-bytes`) is split in halves until it fits, so a run's
        // batch size never decides whether it can finish; one row over the limit fails it.
        let mut pending = vec![(0usize, n)];
        while let Some((start, end)) = pending.pop() {
            let rows = end - start;
            let id = if rows == n {
                request_id.clone()
            } else {
                format!("{request_id}-rows-{start}-{end}")
            };
            let mut shape = vec![rows];
            shape.extend_from_slice(&row_shape);
            let chunk = values[start * width..end * width].to_vec();
            match score_rows(&model, &t, &audit, &actor, &input, shape, chunk, &id).await? {
                Ok(s) => scores.extend(s),
                Err(InferenceError::WorkingMemory { .. }) if rows > 1 => {
                    let mid = start + rows / 2;
                    pending.push((mid, end));
                    pending.push((start, mid));
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("inference on {} failed", model.name)));
                }
            }
        }
        out.push(scores);
    }
    Ok(out)
}

/// One request of `shape[0]` rows to one model, audited: the scores of its target, or the
/// model's refusal (the outer error is the run's own: the audit trail, a wrong answer).
#[allow(clippy::too_many_arguments)]
async fn score_rows(
    model: &LoadedModel,
    t: &Target,
    audit: &AuditLog,
    actor: &str,
    input: &str,
    shape: Vec<usize>,
    values: Vec<f32>,
    request_id: &str,
) -> anyhow::Result<Result<Vec<f64>, InferenceError>> {
    let n = shape[0];
    let tensor = Tensor::from_vec(shape, values)?;
    let inputs = vec![NamedTensor::new(input.to_owned(), tensor)];
    let mut event = AuditEvent {
        kind: EventKind::Inference,
        request_id: request_id.to_owned(),
        model: model.name.clone(),
        version: model.version.to_string(),
        model_sha256: model.model_sha256.clone(),
        input_sha256: Some(tensors_sha256(&inputs)),
        output_sha256: None,
        rows: Some(n),
        status: 500,
        outcome: Outcome::Failed,
        actor: Some(actor.to_owned()),
        detail: Some("validation run".to_owned()),
    };
    let outputs = model.worker.infer(inputs).await;
    match &outputs {
        Ok(o) => {
            event.output_sha256 = Some(tensors_sha256(o));
            event.status = 200;
            event.outcome = Outcome::Ok;
        }
        Err(e) if e.is_client_error() => event.status = 400,
        Err(_) => {}
    }
    // No prediction is used without its audit record.
    audit
        .record(event)
        .await
        .context("the audit trail cannot be written")?;
    let outputs = match outputs {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    let view = outputs
        .iter()
        .find(|o| o.name == t.output)
        .and_then(|o| o.tensor.view::<f32>())
        .ok_or_else(|| anyhow!("{} returned no FP32 output {:?}", model.name, t.output))?;
    let cols = view.shape().last().copied().unwrap_or(0);
    if cols != t.width || view.len() != n * cols {
        bail!(
            "{} answered {:?} for {n} rows; its manifest declares {} columns",
            model.name,
            view.shape(),
            t.width
        );
    }
    let flat: Vec<f32> = view.iter().copied().collect();
    let scored: Vec<f32> = if t.multiclass() {
        flat
    } else {
        flat.chunks(cols).map(|r| r[t.column]).collect()
    };
    if scored.iter().any(|p| !p.is_finite()) {
        bail!(
            "{} returned a non-finite score in batch {request_id}",
            model.name
        );
    }
    Ok(Ok(scored.into_iter().map(f64::from).collect()))
}

fn execute(args: &ValidateArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    let report = run_job(args, RunContext::default())?;
    if args.quiet {
        // The gate's verdict and the report's path all the same (`--quiet` printed nothing,
        // and a failing gate exited 1 without a word: a review's finding).
        print_verdict(&report, &args.out);
    } else {
        print_summary(
            &report,
            &args.out,
            started.elapsed().as_secs_f64(),
            report.source == "predictions",
        );
    }
    Ok(report.gate.as_ref().is_none_or(|g| g.passed))
}

/// Runs one validation and writes `report.json` and `report.html` into `args.out`.
pub fn run_job(args: &ValidateArgs, ctx: RunContext) -> anyhow::Result<Report> {
    // A panic anywhere in the run (a dependency's: npyz multiplied a header's shape past
    // u64 and panicked) ends it as an error: a server's run thread then frees its slot and
    // its model, and deletes an upload (a red-team finding: four such panics blocked every
    // validation run until a restart); the command line exits 2, as for bad data.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job_inner(args, ctx)))
        .unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            Err(anyhow!(
                "the run stopped on an internal error (a panic: {}); nothing of it is kept",
                message.chars().take(200).collect::<String>()
            ))
        })
}

fn run_job_inner(args: &ValidateArgs, ctx: RunContext) -> anyhow::Result<Report> {
    let mut settings = settings(args)?;
    // A run stopped while it evaluates stops its bootstrap too (its replicates held the
    // shared thread pool for minutes; see `BootstrapSpec::stop`).
    settings.stop = ctx
        .progress
        .as_ref()
        .map(|p| nightingale_validation::bootstrap::Stop(p.cancelled.clone()));
    // The patient-id column identifies patients: as a subgroup every identifier would be
    // listed in the report with its counts (each patient's outcome, in a small cohort), and
    // as the label column its values would be quoted (red-team findings).
    if let Some(id) = &args.patient_id_column {
        if args.subgroups.contains(id) {
            bail!(
                "the patient-id column {:?} cannot be a subgroup: its values identify patients",
                clip(id)
            );
        }
        if *id == args.label_column {
            bail!(
                "the patient-id column {:?} cannot be the label column",
                clip(id)
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    // The folder says what its last run found: an earlier run's report goes now, so that a
    // run that fails leaves none (a pipeline reading report.json, or --require-validation on
    // the folder, took the earlier pass for this run's: a red-team finding).
    for file in ["report.json", "report.html"] {
        let path = args.out.join(file);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| {
                    format!("cannot remove the earlier report {}", path.display())
                });
            }
            _ => {}
        }
    }
    let options = match ctx.options.clone() {
        Some(o) => o,
        None => RepositoryOptions {
            backend: match args.backend {
                BackendArg::Tract => BackendKind::Tract,
                BackendArg::Ort => BackendKind::Ort,
            },
            ort_library: args.ort_library.clone(),
            max_working_bytes: args.max_inference_bytes,
            signatures: SignaturePolicy::load(&args.trusted_keys, args.require_signatures)?,
            probe: crate::probe_command(),
            ..RepositoryOptions::default()
        },
    };
    // The run's copies of served models are told apart from them in the metrics.
    // ... and run one instance each (their batches go one after another; a researcher's
    // runs must not add 64-instance models' threads to the server's).
    let options = RepositoryOptions {
        metrics_purpose: Some("validation".to_owned()),
        instance_limit: 1,
        ..options
    };
    let repository = Repository::new(args.repository.clone(), options);
    let actor = ctx.actor.clone().unwrap_or_else(|| "validate".to_owned());
    // Which models: one, two (compare) or none (predictions without --model).
    let names: Vec<(String, Option<u64>)> = match (&args.compare, &args.model) {
        (Some(c), _) => {
            let parts: Vec<&str> = c.split(',').map(str::trim).collect();
            let [a, b] = parts.as_slice() else {
                bail!("--compare takes NAME@V1,NAME@V2");
            };
            let (a, b) = (parse_model(a)?, parse_model(b)?);
            if a.1.is_none() || b.1.is_none() {
                bail!("--compare needs both versions: NAME@V1,NAME@V2");
            }
            vec![a, b]
        }
        (None, Some(m)) => vec![parse_model(m)?],
        (None, None) => Vec::new(),
    };
    let mut loaded = Vec::new();
    for (name, version) in &names {
        loaded.push(load(&repository, args, name, *version)?);
    }
    // The report's model is the last one (V2 when comparing).
    let main = loaded.last();
    let target = main.map(|l| l.target.clone());
    let multiclass = target.as_ref().is_some_and(Target::multiclass);
    let labels = target.as_ref().map_or_else(
        || LabelSpec {
            positive: "1".to_owned(),
            classes: vec!["0".to_owned(), "1".to_owned()],
            multiclass: false,
        },
        |t| t.labels.clone(),
    );
    let predictions = args.predictions.is_some();
    if multiclass && loaded.len() > 1 {
        bail!(
            "output {:?} is multi-class: --compare is supported for binary outputs only in \
             this version",
            target
                .as_ref()
                .map(|t| t.output.as_str())
                .unwrap_or_default()
        );
    }
    let class_score_columns: Vec<String> = match (&target, predictions && multiclass) {
        (Some(t), true) if args.score_columns.is_empty() => t
            .labels
            .classes
            .iter()
            .map(|l| format!("score_{l}"))
            .collect(),
        (Some(t), true) => {
            if args.score_columns.len() != t.labels.classes.len() {
                bail!(
                    "--score-columns names {} columns; output {:?} has {} classes",
                    args.score_columns.len(),
                    t.output,
                    t.labels.classes.len()
                );
            }
            args.score_columns.clone()
        }
        _ => Vec::new(),
    };
    let npy = args
        .dataset
        .as_deref()
        .is_some_and(|d| d.is_dir() && NpyDataset::is_npy_folder(d));
    let dicom = !npy
        && args
            .dataset
            .as_deref()
            .is_some_and(|d| d.is_dir() && DicomDataset::is_dicom_folder(d));
    // Image rows come ready-made (npy) or through the pipeline's decoder (DICOM).
    let tensors = npy || dicom;
    let (path, input) = match (&args.predictions, &args.dataset) {
        (Some(p), _) => (p.clone(), None),
        (None, Some(d)) => {
            let l = main.ok_or_else(|| anyhow!("--dataset needs --model or --compare"))?;
            if d.is_dir() && !tensors {
                bail!(
                    "{}: a folder dataset holds images.npy and labels.npy, or manifest.csv \
                     naming DICOM files",
                    d.display()
                );
            }
            (d.clone(), Some(model_input(&l.model.manifest, tensors)?))
        }
        (None, None) => bail!("give --dataset or --predictions"),
    };
    // From here on the dataset is read by its canonical path, through no link: a link
    // anywhere in it is refused at each open (`open_dataset_file`, `path_in`).
    let path = match path.canonicalize() {
        Ok(canonical) if ctx.confined && canonical != path => bail!(
            "the dataset changed after the run was asked for: a link now stands in its place or along its path"
        ),
        Ok(canonical) => canonical,
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    if let Some(a) = loaded.first()
        && let Some(b) = loaded.get(1)
        && model_input(&a.model.manifest, tensors)?.features
            != model_input(&b.model.manifest, tensors)?.features
    {
        bail!("the two versions take different features: they cannot be compared on one dataset");
    }
    let (mut dataset, total_bytes, row_shape) = if dicom {
        let manifest = main
            .map(|l| l.model.manifest.clone())
            .ok_or_else(|| anyhow!("a DICOM dataset needs --model"))?;
        let Some(pre) = manifest.preprocessing.clone() else {
            bail!(
                "bundle {:?} declares no [preprocessing]: DICOM images cannot become its input",
                manifest.name
            );
        };
        let shape = input.as_ref().map(|i| i.shape.clone()).unwrap_or_default();
        let row: Vec<usize> = shape
            .get(1..)
            .unwrap_or(&[])
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(1))
            .collect();
        let [h, w] = pre.size;
        if row.iter().product::<usize>() != h * w {
            bail!("input shape {shape:?} does not hold one {h}x{w} grey image");
        }
        let columns = Columns {
            label: args.label_column.clone(),
            subgroups: args.subgroups.clone(),
            cluster: args.patient_id_column.clone(),
            file: Some("file".to_owned()),
            ..Columns::default()
        };
        let d = DicomDataset::open(&path, &columns, labels.clone(), pre, manifest.dicom.clone())?;
        let bytes = std::fs::metadata(path.join("manifest.csv")).map_or(0, |m| m.len());
        (Data::Dicom(Box::new(d)), bytes, row)
    } else if tensors {
        // images.npy + labels.npy have no columns: a patient-id column or subgroups named
        // for them were taken and ignored (a report of 0 patients: a red-team finding).
        if args.patient_id_column.is_some() || !args.subgroups.is_empty() {
            bail!(
                "{}: a tensor dataset (images.npy + labels.npy) has no columns for \
                 --patient-id-column or --subgroup: use a DICOM folder's manifest.csv",
                path.display()
            );
        }
        let shape = input.as_ref().map(|i| i.shape.clone()).unwrap_or_default();
        let d = NpyDataset::open(&path, &shape, &labels)?;
        let rows = d.row_shape().to_vec();
        let bytes = std::fs::metadata(path.join("images.npy")).map_or(0, |m| m.len());
        (Data::Npy(Box::new(d)), bytes, rows)
    } else {
        let columns = Columns {
            features: input
                .as_ref()
                .map(|i| i.features.clone())
                .unwrap_or_default(),
            label: args.label_column.clone(),
            score: (predictions && !multiclass).then(|| args.score_column.clone()),
            class_scores: class_score_columns.clone(),
            subgroups: args.subgroups.clone(),
            cluster: args.patient_id_column.clone(),
            file: None,
        };
        // The label must not be one of the model's inputs: it would be evaluated as ground
        // truth without complaint (a binary feature), and a refused label quotes its value,
        // which would put feature values in the error (a review's finding).
        if columns.features.contains(&columns.label) {
            bail!(
                "the label column {:?} is one of the model's input features",
                clip(&columns.label)
            );
        }
        let width = columns.features.len();
        let d = CsvDataset::open(&path, &columns, labels.clone())?;
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        (Data::Csv(Box::new(d)), bytes, vec![width])
    };
    let audit_path = args
        .audit_log
        .clone()
        .unwrap_or_else(|| args.out.join("audit.jsonl"));
    // A server's run is known by its id in `/validation/runs/{id}`: its audit records carry
    // it (a red-team finding: they carried a UUID of their own, which nothing else named).
    let run_id = ctx
        .run_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());

    let mut collected = Collected {
        subgroups: args
            .subgroups
            .iter()
            .map(report::SubgroupColumn::new)
            .collect(),
        ..Collected::default()
    };
    let mut progress = Progress::new(total_bytes, args.quiet, ctx.progress.clone());
    let started = Instant::now();
    let mut usable = 0usize;
    if predictions {
        let mut scores = Vec::new();
        while let Some(row) = dataset.next_row()? {
            match row {
                Ok(r) => {
                    collected.y.push(r.label);
                    collected.classes.push(r.class);
                    if multiclass {
                        scores.extend_from_slice(&r.class_scores);
                    } else {
                        scores.push(r.score.unwrap_or(f64::NAN));
                    }
                    push_subgroups(&mut collected, &r.subgroups);
                    if let Some(c) = r.cluster {
                        collected.clusters.push(c);
                    }
                    usable += 1;
                }
                Err(u) => push_unusable(&mut collected, u),
            }
            progress.update(dataset.bytes_read(), usable)?;
        }
        collected.p.push(scores);
    } else {
        let input_name = input.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let models: Vec<(Arc<LoadedModel>, Target)> = loaded
            .iter()
            .map(|l| (l.model.clone(), l.target.clone()))
            .collect();
        let batch_size = models
            .iter()
            .map(|(m, _)| m.manifest.batching.max_batch_size)
            .min()
            .unwrap_or(1)
            .clamp(1, 1024);
        let audit = match &ctx.audit {
            Some(a) => a.clone(),
            None => AuditLog::open(&audit_path, false)
                .with_context(|| format!("cannot open the audit trail {}", audit_path.display()))?,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        collected.p = vec![Vec::new(); models.len()];
        runtime.block_on(async {
            let mut in_flight: VecDeque<InFlight> = VecDeque::new();
            let mut batch: Vec<Vec<f32>> = Vec::with_capacity(batch_size);
            let mut batches = 0usize;
            let drain = |collected: &mut Collected, scores: Vec<Vec<f64>>| {
                for (k, s) in scores.into_iter().enumerate() {
                    collected.p[k].extend(s);
                }
            };
            loop {
                let row = dataset.next_row()?;
                let end = row.is_none();
                match row {
                    Some(Ok(r)) => {
                        collected.y.push(r.label);
                        collected.classes.push(r.class);
                        push_subgroups(&mut collected, &r.subgroups);
                        if let Some(c) = r.cluster {
                            collected.clusters.push(c);
                        }
                        batch.push(r.features);
                        usable += 1;
                    }
                    Some(Err(u)) => push_unusable(&mut collected, u),
                    None => {}
                }
                if batch.len() == batch_size || (end && !batch.is_empty()) {
                    batches += 1;
                    in_flight.push_back(tokio::spawn(score_batch(
                        models.clone(),
                        audit.clone(),
                        actor.clone(),
                        input_name.clone(),
                        row_shape.clone(),
                        std::mem::replace(&mut batch, Vec::with_capacity(batch_size)),
                        format!("validate-{run_id}-{batches}"),
                    )));
                    // a few batches in flight keep the worker's batcher busy; order is kept
                    while in_flight.len() > 4 {
                        let done = in_flight.pop_front().expect("non-empty");
                        drain(&mut collected, done.await??);
                    }
                    progress.update(dataset.bytes_read(), usable)?;
                }
                if end {
                    break;
                }
            }
            while let Some(done) = in_flight.pop_front() {
                drain(&mut collected, done.await??);
            }
            anyhow::Ok(())
        })?;
    }
    progress.finish();
    let infer_secs = started.elapsed().as_secs_f64();
    let mut summary = dataset.finish()?;
    if let Some(label) = &ctx.dataset_label {
        summary.path = label.clone();
    }
    if collected.y.is_empty() {
        bail!(
            "{}: no usable rows ({} read, {} unusable{})",
            path.display(),
            summary.rows_read,
            collected.unusable_count,
            collected
                .unusable
                .first()
                .map(|u| format!("; row {}: {}", u.row, u.reason))
                .unwrap_or_default()
        );
    }

    let subgroup_columns = std::mem::take(&mut collected.subgroups);
    let p = collected.p.last().cloned().unwrap_or_default();
    let scored = Scored {
        y: &collected.y,
        p: &p,
        subgroups: &subgroup_columns,
        clusters: args
            .patient_id_column
            .is_some()
            .then_some(collected.clusters.as_slice()),
    };
    let thresholds = target
        .as_ref()
        .map(|t| t.thresholds.clone())
        .unwrap_or_default();
    let spec = (settings.bootstrap_replicates > 0).then_some(BootstrapSpec {
        replicates: settings.bootstrap_replicates,
        seed: settings.seed,
        confidence: settings.confidence,
        stop: settings.stop.clone(),
    });
    let (metrics, curves, subgroups, clusters, multi) = if multiclass {
        let labels = target
            .as_ref()
            .map(|t| t.labels.classes.clone())
            .unwrap_or_default();
        // Rows clustered by patient: the macro AUROC's bootstrap resamples patients, the
        // gate counts patients, row-level intervals are dropped (without this, a gate passed
        // on three patients' rows taken as independent: a red-team finding).
        let clusters = scored.clusters.map(report::cluster_index);
        let by_patient = clusters.as_ref().map(|(c, k)| (c.as_slice(), *k));
        let m = multiclass::evaluate(
            &collected.classes,
            &p,
            &labels,
            settings.confidence,
            spec,
            by_patient,
        );
        let subgroups = report::multiclass_subgroups(
            &collected.classes,
            &p,
            &labels,
            &subgroup_columns,
            &settings,
            by_patient,
        );
        (None, None, subgroups, clusters.map(|(_, k)| k), Some(m))
    } else {
        let (m, c, s, k) = report::evaluate(&scored, &thresholds, &settings);
        (Some(m), Some(c), s, k, None)
    };
    let comparison = match (loaded.first(), loaded.get(1)) {
        (Some(a), Some(b)) => Some(report::compare(
            &collected.y,
            &collected.p[0],
            &collected.p[1],
            (
                format!("{}@{}", a.identity.name, a.identity.version),
                format!("{}@{}", b.identity.name, b.identity.version),
            ),
            settings.confidence,
        )),
        _ => None,
    };
    let gate = main.and_then(|l| {
        let spec = l.model.manifest.validation.as_ref()?;
        let version = Some(l.model.version);
        if spec.gate_for(version).is_empty() {
            return None;
        }
        let mut gate = match (&metrics, &multi) {
            (Some(m), _) => check_gate(spec, version, m, &settings),
            (None, Some(m)) => check_gate_multiclass(spec, version, m, &settings),
            (None, None) => return None,
        };
        // With the minimum-sample rule, before the bundle's criteria.
        let rule = nightingale_validation::gate::unusable_rows(
            spec,
            collected.y.len(),
            collected.unusable_count,
        );
        gate.passed &= rule.passed;
        let at = gate.criteria.len().min(2);
        gate.criteria.insert(at, rule);
        Some(gate)
    });
    let mut identity = main.map(|l| l.identity.clone());
    if predictions && let Some(i) = identity.as_mut() {
        i.backend = None;
    }
    let (n, positives) = match (&metrics, &multi) {
        (Some(m), _) => (m.n, Some(m.positives)),
        (None, Some(m)) => (m.n, None),
        (None, None) => (0, None),
    };
    let tripod = tripod_items(
        &identity,
        &summary,
        (n, positives),
        &collected,
        &settings,
        &args.subgroups,
    );
    let report = Report {
        schema: report::SCHEMA,
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        run_id: run_id.clone(),
        nightingale_version: env!("CARGO_PKG_VERSION").to_owned(),
        source: if predictions {
            "predictions"
        } else {
            "inference"
        },
        model: identity,
        dataset: DatasetSection {
            summary,
            kind: if predictions {
                "predictions-csv"
            } else if dicom {
                "dicom-folder"
            } else if npy {
                "npy-tensors"
            } else {
                "tabular-csv"
            },
            origin: if ctx.uploaded {
                "upload"
            } else if ctx.researcher {
                "researcher"
            } else {
                "file"
            },
            label_column: args.label_column.clone(),
            score_column: (predictions && !multiclass).then(|| args.score_column.clone()),
            subgroup_columns: args.subgroups.clone(),
            cluster_column: args.patient_id_column.clone(),
            clusters,
            rows_used: collected.y.len(),
            rows_unusable: collected.unusable_count,
            unusable: collected.unusable,
            unusable_truncated: collected.unusable_count > LISTED_UNUSABLE,
        },
        settings,
        task: if multiclass { "multiclass" } else { "binary" },
        metrics,
        multiclass: multi,
        curves,
        subgroups,
        comparison,
        gate,
        tripod_ai: tripod,
    };
    // A run cancelled (or stopped at the server's limit) while it evaluated keeps no report.
    if ctx
        .progress
        .as_ref()
        .is_some_and(|p| p.cancelled.load(std::sync::atomic::Ordering::Relaxed))
    {
        bail!("the run was cancelled");
    }
    write_report(&args.out, &report)?;
    tracing::info!(
        rows = report.dataset.rows_used,
        secs = infer_secs,
        gate = ?report.gate.as_ref().map(|g| g.passed),
        "validation report written"
    );
    Ok(report)
}

fn push_subgroups(c: &mut Collected, values: &[String]) {
    for (column, v) in c.subgroups.iter_mut().zip(values) {
        column.push(v);
    }
}

fn push_unusable(c: &mut Collected, u: Unusable) {
    c.unusable_count += 1;
    if c.unusable.len() < LISTED_UNUSABLE {
        c.unusable.push(u);
    }
}

fn write_report(out: &Path, report: &Report) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(report)?;
    write_atomic(&out.join("report.json"), &json)?;
    write_atomic(&out.join("report.html"), html::render(report).as_bytes())
}

/// Writes through a new file created exclusively under an unpredictable name beside `path`
/// (never through a link planted under a fixed temporary name), flushed, then renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let cannot = || format!("cannot write {}", path.display());
    // The mode a plain create gives (0666 less the umask), not tempfile's private 0600.
    let mut tmp = tempfile::Builder::new()
        .prefix(".report.")
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .with_context(cannot)?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(cannot)?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(cannot)?;
    Ok(())
}

fn tripod_items(
    model: &Option<ModelIdentity>,
    data: &nightingale_validation::DatasetSummary,
    (n, positives): (usize, Option<usize>),
    c: &Collected,
    s: &Settings,
    subgroups: &[String],
) -> std::collections::BTreeMap<String, String> {
    let mut t = std::collections::BTreeMap::new();
    t.insert(
        "data source".to_owned(),
        format!(
            "{} (SHA-256 {}, {} bytes)",
            data.path, data.sha256, data.bytes
        ),
    );
    t.insert(
        "participants and outcome events".to_owned(),
        match positives {
            Some(pos) => format!(
                "{n} rows used of {} read; {pos} with the outcome ({:.1} %)",
                data.rows_read,
                100.0 * pos as f64 / n.max(1) as f64
            ),
            None => format!(
                "{n} rows used of {} read (class counts in the report)",
                data.rows_read
            ),
        },
    );
    t.insert(
        "missing data".to_owned(),
        format!(
            "complete-case: {} rows with a missing or non-numeric feature, or a label outside \
             the model's classes, were excluded and are listed by row number; nothing was imputed",
            c.unusable_count
        ),
    );
    if let Some(i) = model {
        t.insert(
            "model".to_owned(),
            format!(
                "{} version {} (model SHA-256 {}, manifest SHA-256 {}, signature {}), run by {}",
                i.name,
                i.version,
                i.model_sha256,
                i.manifest_sha256,
                i.signature_key_id.as_deref().unwrap_or("none"),
                i.backend
                    .as_deref()
                    .unwrap_or("another system (predictions file)")
            ),
        );
    }
    t.insert(
        "performance measures".to_owned(),
        format!(
            "discrimination: AUROC with DeLong {ci} CI and a {b}-replicate percentile bootstrap \
             (seed {seed}), average precision; calibration: intercept and slope (logistic \
             recalibration, Wald CIs), Brier score, expected calibration error over {bins} \
             equal-width bins; classification at the declared thresholds with Wilson CIs; \
             clinical utility: net benefit (decision curve)",
            ci = format_args!("{:.0} %", s.confidence * 100.0),
            b = s.bootstrap_replicates,
            seed = s.seed,
            bins = s.calibration_bins
        ),
    );
    if !subgroups.is_empty() {
        t.insert(
            "fairness (subgroups)".to_owned(),
            format!(
                "metrics per value of {}; subgroups under {} rows or without both classes are \
                 reported as insufficient",
                subgroups.join(", "),
                s.min_subgroup_n
            ),
        );
    }
    t.insert(
        "software".to_owned(),
        format!(
            "Nightingale {} (nightingale validate)",
            env!("CARGO_PKG_VERSION")
        ),
    );
    t
}

fn print_summary(r: &Report, out: &Path, secs: f64, predictions: bool) {
    let ci = |x: &report::Metric| match (x.value, x.ci_lower, x.ci_upper) {
        (Some(v), Some(l), Some(u)) => format!("{v:.4} ({l:.4}-{u:.4})"),
        (Some(v), _, _) => format!("{v:.4}"),
        _ => "not defined".to_owned(),
    };
    if let Some(i) = &r.model {
        println!(
            "model     {}@{} ({}), manifest sha256 {}",
            i.name,
            i.version,
            i.backend.as_deref().unwrap_or("predictions file"),
            i.manifest_sha256
        );
    }
    let rate = |n: usize| {
        if predictions {
            String::new()
        } else {
            format!(", {:.0} rows/s", n as f64 / secs.max(1e-9))
        }
    };
    if let Some(m) = &r.metrics {
        println!(
            "dataset   {} rows used, {} unusable, {} positives{}",
            m.n,
            r.dataset.rows_unusable,
            m.positives,
            rate(m.n)
        );
        println!("auroc     {}", ci(&m.auroc));
        println!("auprc     {}", ci(&m.auprc));
        println!("brier     {}", ci(&m.brier));
        println!("cal slope {}", ci(&m.calibration_slope));
        for op in m.operating_points.iter().filter(|o| o.source == "bundle") {
            println!(
                "@{}  sensitivity {}  specificity {}",
                op.name,
                ci(&op.sensitivity),
                ci(&op.specificity)
            );
        }
    }
    if let Some(m) = &r.multiclass {
        println!(
            "dataset   {} rows used, {} unusable, {} classes{}",
            m.n,
            r.dataset.rows_unusable,
            m.labels.len(),
            rate(m.n)
        );
        println!("auroc     {} (macro, one-vs-rest)", ci(&m.auroc));
        println!("accuracy  {}", ci(&m.accuracy));
        println!("macro F1  {}", ci(&m.macro_f1));
    }
    if let Some(c) = &r.comparison
        && let Some(d) = &c.auroc_difference
    {
        println!(
            "compare   {} - {}: AUROC difference {:+.4} (p = {:.4}, DeLong)",
            c.b, c.a, d.difference, d.p_value
        );
    }
    print_verdict(r, out);
}

/// The gate's criteria, each passed or failed, and where the report is.
fn print_verdict(r: &Report, out: &Path) {
    match &r.gate {
        Some(g) => {
            for c in &g.criteria {
                println!(
                    "gate      {} {}: {}",
                    if c.passed { "PASS" } else { "FAIL" },
                    c.criterion,
                    c.reason.as_deref().unwrap_or("ok")
                );
            }
        }
        // Exit 0 all the same, but a report without a gate never lets a version serve under
        // `--require-validation` (it printed nothing, and the server's refusal read as a
        // failed metric: a review's finding).
        None if r.source == "inference" => println!(
            "gate      none: the bundle declares no [[validation.gate]], so this report cannot let \
             it serve under --require-validation (docs/validation.md)"
        ),
        None => {}
    }
    println!("report    {}", out.join("report.html").display());
}

/// What `--require-validation` reads of a report.
#[derive(serde::Deserialize)]
struct ReportHead {
    source: String,
    /// RFC 3339 UTC, so the text orders as the time does.
    #[serde(default)]
    created: String,
    model: Option<ReportModel>,
    dataset: Option<ReportDataset>,
    gate: Option<ReportGate>,
    settings: Option<ReportSettings>,
}

#[derive(serde::Deserialize)]
struct ReportDataset {
    /// `file` or `upload`; reports from before the field was written have none (`file`:
    /// uploads over HTTP came later than the field).
    #[serde(default)]
    origin: Option<String>,
}

#[derive(serde::Deserialize)]
struct ReportModel {
    name: String,
    version: u64,
    manifest_sha256: String,
}

#[derive(serde::Deserialize)]
struct ReportGate {
    passed: bool,
    #[serde(default)]
    criteria: Vec<ReportCriterion>,
}

#[derive(serde::Deserialize)]
struct ReportCriterion {
    metric: String,
    bound: String,
}

#[derive(serde::Deserialize)]
struct ReportSettings {
    confidence: f64,
    calibration_bins: usize,
}

/// Reports larger than this are not read (a report is ~100 KB).
pub(crate) const MAX_REPORT_BYTES: u64 = 32 << 20;

/// The deployment policy of `serve --require-validation`: a version serves only when the
/// newest `report.json` in a folder under `reports` (or in `reports` itself) that ran that
/// version through the served path (`source` `inference`) for the exact manifest SHA-256
/// being loaded, on a dataset the operator's side provided (`dataset.origin` `file`, not an
/// upload), passed a gate that is not empty. A newer failing report withdraws an older pass;
/// an uploaded dataset's report never counts (its labels are the uploader's word).
pub fn require_validation(reports: PathBuf) -> nightingale_models::PromotionCheck {
    let folder = reports.clone();
    let evidence = move || {
        // Each candidate report's path, size and modification time (or that it is absent):
        // a report written, replaced or removed changes it.
        use sha2::{Digest as _, Sha256};
        let mut hash = Sha256::new();
        let mut candidates = report_candidates(&folder);
        candidates.sort();
        for path in candidates {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .unwrap_or_default();
            let name = path.as_os_str().as_encoded_bytes();
            hash.update((name.len() as u64).to_le_bytes());
            hash.update(name);
            hash.update(meta.len().to_le_bytes());
            hash.update(modified.as_nanos().to_le_bytes());
        }
        hash.finalize().into()
    };
    // Each report read once while it stays the same file (inode, size, modification time):
    // every load check read and parsed every report in the folder again (5,000 researchers'
    // reports took 5.6 s per bundle load: a review's finding).
    type Seen = (u64, u64, std::time::SystemTime);
    type Cache = std::collections::HashMap<PathBuf, (Seen, Option<Arc<ReportHead>>)>;
    let cache: std::sync::Mutex<Cache> = std::sync::Mutex::default();
    let check = move |name: &str, version: u64, manifest_sha256: &str| {
        let candidates = report_candidates(&reports);
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|path, _| candidates.contains(path));
        // (created, passed, judged by a gate) of the newest report that counts.
        let mut newest: Option<(String, bool, bool)> = None;
        let mut others_only = false;
        let mut predictions_only = false;
        for path in candidates {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if meta.len() > MAX_REPORT_BYTES {
                // Not read, and not silently: a report this large is not one this program
                // wrote (its dataset's names are bounded in it).
                tracing::warn!(report = %path.display(), bytes = meta.len(),
                    "a validation report over 32 MiB is not read for --require-validation");
                continue;
            }
            use std::os::unix::fs::MetadataExt as _;
            let seen: Seen = (
                meta.ino(),
                meta.len(),
                meta.modified().unwrap_or(std::time::UNIX_EPOCH),
            );
            let head = match cache.get(&path) {
                Some((was, head)) if *was == seen => head.clone(),
                _ => {
                    let head = std::fs::read(&path)
                        .ok()
                        .and_then(|bytes| serde_json::from_slice::<ReportHead>(&bytes).ok())
                        .map(Arc::new);
                    cache.insert(path.clone(), (seen, head.clone()));
                    head
                }
            };
            let Some(head) = head else {
                continue;
            };
            let Some(model) = &head.model else { continue };
            if model.name != name
                || model.version != version
                || model.manifest_sha256 != manifest_sha256
            {
                continue;
            }
            if head.source != "inference" {
                // Scored from predictions the model did not make here (`--predictions`).
                predictions_only = true;
                continue;
            }
            if head
                .dataset
                .as_ref()
                .and_then(|d| d.origin.as_deref())
                .is_some_and(|o| o != "file")
            {
                others_only = true;
                continue;
            }
            // A pass at settings the gate is not read at does not count (a report of a
            // version before the gate checked them: a 51 % interval passed a gate on the
            // 95 % lower limit; see `nightingale_validation::gate::unjudgeable`).
            let judged_at_gate_settings = |g: &ReportGate| {
                let Some(s) = &head.settings else {
                    return false;
                };
                let settings = nightingale_validation::report::Settings {
                    confidence: s.confidence,
                    calibration_bins: s.calibration_bins,
                    ..nightingale_validation::report::Settings::default()
                };
                g.criteria.iter().all(|c| {
                    nightingale_validation::gate::unjudgeable(&c.metric, &c.bound, &settings)
                        .is_none()
                })
            };
            let passed = head
                .gate
                .as_ref()
                .is_some_and(|g| g.passed && judged_at_gate_settings(g));
            // Reports made in the same second (`created` has second resolution) are not
            // ordered by anything but the folder listing: a failed one among them decides,
            // whatever that order (a review made the same pair pass or fail by renaming
            // folders).
            let newer = newest.as_ref().is_none_or(|(created, was_passed, _)| {
                head.created > *created || (head.created == *created && *was_passed)
            });
            if newer {
                newest = Some((head.created.clone(), passed, head.gate.is_some()));
            }
        }
        Err(match newest {
            Some((_, true, _)) => return Ok(()),
            Some((created, false, false)) => format!(
                "its newest validation report for manifest {manifest_sha256} ({created}) has no \
                 gate: the bundle declares no [[validation.gate]], and a report passes the \
                 deployment gate only on its criteria (--require-validation; docs/validation.md)"
            ),
            Some((created, false, true)) => format!(
                "its newest validation report for manifest {manifest_sha256} ({created}) does \
                 not pass a gate (--require-validation)"
            ),
            None if others_only => format!(
                "its only validation reports of {name} version {version} for manifest \
                 {manifest_sha256} are on uploaded datasets or of researchers' runs, which the \
                 deployment gate does not count: validate on a dataset under --validation-root \
                 as an admin or with `nightingale \
                 validate` (--require-validation)"
            ),
            None if predictions_only => format!(
                "its only validation reports of {name} version {version} for manifest \
                 {manifest_sha256} were scored from given predictions (--predictions), which \
                 the deployment gate does not count: validate the model itself (--model) \
                 (--require-validation)"
            ),
            // The data folder is not named: this is answered over HTTP, to callers who may
            // not learn the server's paths (a review's finding).
            None => format!(
                "no validation report of {name} version {version} for manifest \
                 {manifest_sha256} in the validation reports' folder (--validation-reports; \
                 <data folder>/validation/runs by default; --require-validation)"
            ),
        })
    };
    nightingale_models::PromotionCheck(Arc::new(check), Some(Arc::new(evidence)))
}

/// The report files `--require-validation` reads: `report.json` in the folder and in each
/// folder inside it.
fn report_candidates(reports: &Path) -> Vec<PathBuf> {
    let mut candidates = vec![reports.join("report.json")];
    if let Ok(entries) = std::fs::read_dir(reports) {
        candidates.extend(entries.flatten().map(|e| e.path().join("report.json")));
    }
    candidates
}

#[cfg(test)]
mod write_tests {
    use super::write_atomic;

    #[test]
    fn reports_are_not_written_through_a_link_planted_under_a_temporary_name() {
        let out = tempfile::tempdir().unwrap();
        let victim = out.path().join("victim.txt");
        std::fs::write(&victim, "theirs").unwrap();
        // The fixed name the report was written through before.
        std::os::unix::fs::symlink(&victim, out.path().join("report.tmp")).unwrap();
        let report = out.path().join("report.json");
        write_atomic(&report, b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "theirs");
        assert_eq!(std::fs::read(&report).unwrap(), b"{}");
        // Readable as a plainly created file is, not private to the writer.
        use std::os::unix::fs::PermissionsExt as _;
        let plain = out.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&report), mode(&plain));
        assert!(
            std::fs::symlink_metadata(&report)
                .unwrap()
                .file_type()
                .is_file()
        );
    }
}

#[cfg(test)]
mod promotion_tests {
    use super::require_validation;

    fn report(dir: &std::path::Path, folder: &str, created: &str, passed: bool) {
        report_at(dir, folder, created, passed, 0.95, 10);
    }

    fn report_at(
        dir: &std::path::Path,
        folder: &str,
        created: &str,
        passed: bool,
        confidence: f64,
        calibration_bins: usize,
    ) {
        let dir = dir.join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::json!({
            "source": "inference",
            "created": created,
            "model": {"name": "m", "version": 2, "manifest_sha256": "abc"},
            "dataset": {"origin": "file"},
            "settings": {"confidence": confidence, "calibration_bins": calibration_bins},
            "gate": {"passed": passed, "criteria": [
                {"metric": "positives", "bound": "value"},
                {"metric": "auroc", "bound": "ci_lower"},
                {"metric": "ece", "bound": "value"}]},
        });
        std::fs::write(dir.join("report.json"), json.to_string()).unwrap();
    }

    /// The evidence the poller compares changes when a report is written, replaced or
    /// removed, in the folder or a folder inside it, and not for other files.
    #[test]
    fn the_evidence_follows_the_reports_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let check = require_validation(dir.path().to_path_buf());
        let evidence = check.1.clone().unwrap();
        let empty = evidence();
        std::fs::create_dir(dir.path().join("run-1")).unwrap();
        std::fs::write(dir.path().join("run-1/progress.json"), "{}").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        assert_eq!(evidence(), empty, "files that are not reports");
        report(dir.path(), "run-1", "2026-12-05T06:41:47Z", true);
        let one = evidence();
        assert_ne!(one, empty, "a report written in a run's folder");
        assert_eq!(evidence(), one, "nothing changed");
        report(dir.path(), "run-1", "2026-12-05T06:41:47Z", false);
        let replaced = evidence();
        assert_ne!(replaced, one, "a report replaced (another length)");
        std::fs::write(dir.path().join("report.json"), "{}").unwrap();
        assert_ne!(evidence(), replaced, "a report in the folder itself");
        std::fs::remove_file(dir.path().join("report.json")).unwrap();
        assert_eq!(evidence(), replaced, "and removed again");
    }

    /// A red-team finding: a report made with a looser confidence level or fewer
    /// calibration bins (by a version before the gate checked them) passed a gate on the
    /// 95 % lower limit or the ten-bin ECE, and its version was served.
    #[test]
    fn a_pass_at_other_settings_than_the_gates_does_not_count() {
        for (confidence, bins) in [(0.51, 10), (0.95, 1)] {
            let dir = tempfile::tempdir().unwrap();
            report_at(
                dir.path(),
                "loose",
                "2026-12-05T06:41:47Z",
                true,
                confidence,
                bins,
            );
            let check = require_validation(dir.path().to_path_buf());
            assert!((check.0)("m", 2, "abc").is_err(), "{confidence} {bins}");
            report(dir.path(), "usual", "2026-12-05T06:41:48Z", true);
            assert!((check.0)("m", 2, "abc").is_ok());
        }
    }

    /// Reports are read once and kept while they stay the same file (a review's finding:
    /// every load check parsed every report again); one replaced, even by one of the same
    /// size, or removed, is read anew.
    #[test]
    fn a_report_replaced_between_checks_is_read_anew() {
        let dir = tempfile::tempdir().unwrap();
        report(dir.path(), "run", "2026-12-05T06:41:47Z", true);
        let check = require_validation(dir.path().to_path_buf());
        assert!((check.0)("m", 2, "abc").is_ok());
        assert!((check.0)("m", 2, "abc").is_ok());
        // Replaced as reports are written (a new file renamed over it): "passed": false, and
        // the creation time one character shorter, so the file keeps its size.
        let path = dir.path().join("run/report.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let failed = text
            .replace("\"passed\":true", "\"passed\":false")
            .replacen("2026-12-05T06:41:47Z", "2026-12-05T06:41:4Z", 1);
        assert_eq!(failed.len(), text.len());
        std::fs::write(dir.path().join("run/new.json"), failed).unwrap();
        std::fs::rename(dir.path().join("run/new.json"), &path).unwrap();
        assert!((check.0)("m", 2, "abc").is_err());
        std::fs::remove_file(&path).unwrap();
        assert!((check.0)("m", 2, "abc").is_err());
    }

    /// A review's finding: reports made in the same second were ordered by the folder
    /// listing, so renaming folders turned a version's pass into a failure and back.
    #[test]
    fn a_failed_report_of_the_same_second_decides_whatever_the_folder_order() {
        for names in [["a", "b", "c"], ["c", "b", "a"], ["b", "a", "c"]] {
            let dir = tempfile::tempdir().unwrap();
            report(dir.path(), names[0], "2026-12-05T06:41:47Z", true);
            report(dir.path(), names[1], "2026-12-05T06:41:47Z", false);
            report(dir.path(), names[2], "2026-12-05T06:41:47Z", true);
            let check = require_validation(dir.path().to_path_buf());
            assert!((check.0)("m", 2, "abc").is_err(), "{names:?}");
            // A later pass decides.
            report(dir.path(), "later", "2026-12-05T06:41:48Z", true);
            assert!((check.0)("m", 2, "abc").is_ok(), "{names:?}");
        }
    }
}
