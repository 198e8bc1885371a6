//! The audit trail: one record per event (every inference request that reached a model, and
//! every model load, unload, rollback and refused bundle with its actor), with the model name, version and file checksum, SHA-256 digests of the inputs and
//! outputs (never the data), the HTTP status and the outcome, in a hash chain that makes any
//! edit, deletion or reordering detectable (`nightingale audit verify`).
//!
//! A dedicated thread appends records to a [`AuditStore`]: JSON lines with rotation
//! ([`jsonl`], the embedded default), SQLite ([`sqlite`]) or PostgreSQL ([`postgres`], shared by
//! replicas). Writers wait for their record to be stored (group commit: everything queued is
//! appended in one go, all or nothing, then all its writers are answered), so a prediction is
//! never returned before its audit record is stored. If the store cannot be written the request
//! fails: the server fails closed rather than serve unaudited predictions, and the store
//! repairs itself before the next group, so the chain on disk always verifies.
//!
//! A request that reached a model but whose answer was never delivered (the whole-request
//! deadline fired, the client went away) is still recorded, with outcome `timeout` or
//! `client-gone`: see [`PendingRecord`].

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nightingale_inference::NamedTensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

pub mod anchor;
mod chain;
pub mod dicom;
pub mod held;
pub mod jsonl;
pub mod postgres;
pub mod sqlite;
pub mod throttle;

pub use chain::{GENESIS, Tail};

/// What an audit record is about.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A request to a model's inference endpoint.
    Inference,
    /// A request to a model's explain endpoint: the inference and the forward passes of its
    /// explanation (method and count in `detail`).
    Explain,
    /// Versions of a model started serving (a load through the API, the repository poller
    /// or start-up). One record per version.
    ModelLoad,
    /// A model stopped serving.
    ModelUnload,
    /// A rollback: one named version serves alone.
    ModelRollback,
    /// A load was refused (bad signature, checksum, self-test, …); what served before still
    /// serves.
    ModelRefused,
    // ---- DICOM ingest (issue 8, OPS slice): see [`dicom`] ----
    /// A DICOM association was accepted, rejected, released or aborted.
    DicomAssociation,
    /// A DICOM instance was stored or refused (C-STORE).
    DicomInstance,
    // ---- end DICOM ----
    /// A result object (SR, SC) made by the DICOM pipeline from a model's output (issue 9):
    /// its SOP Instance UID (hashed), the model and version that made it.
    DicomResult,
    /// A result object's delivery to a destination by C-STORE ended: delivered (with the
    /// destination's status), refused by it, or given up (dead-lettered); `actor` is the
    /// destination as configured (`AE@host:port`), `request_id` the job's. Who received a
    /// patient's results is in the trail, not only in the results store its retention purges.
    DicomResultSent,
    /// A request to an admin endpoint (model load, unload, rollback; HTTP or gRPC) refused
    /// for its credentials (401, 403): the path, the status and the caller (or
    /// `unauthenticated`: those are throttled, a burst then one a second, the rest counted).
    AccessRefused,
    /// A CDS Hooks call answered (issue 10): the service, hookInstance, cards and latency.
    CdsHook,
    /// Feedback on a CDS card: accepted or overridden, and why (coded).
    CdsFeedback,
    /// Received DICOM read back over DICOMweb: a WADO-RS retrieval (study, series or
    /// instance) or a QIDO-RS search, by whom, and how much (UIDs hashed or omitted as for
    /// ingest; the search's keys by name, never their values). Written before the data is
    /// sent: patient data does not leave without its access record.
    DicomwebRead,
    /// Received DICOM deleted: a purge of the spool (`retention`, or an operator's
    /// `nightingale spool purge`, recorded by the server once it runs), one record for the
    /// purge (who, the cutoff, what it deleted) and one per study it deleted instances of
    /// (DICOM PS3.15's "Study Deleted" event; the study's UID hashed or omitted as for
    /// ingest); the pipeline's results deleted by their retention.
    SpoolPurge,
    /// A command an operator ran on the data folder and the server then acted on
    /// (`nightingale results reprocess`, `results resend`): who (`operator:<login>`), when
    /// (`at_ms`), the command and what it queued, the study by its UID's SHA-256. Kept by
    /// the command in the results store and written by the server (within 5 s, or at its
    /// next start).
    OperatorCommand,
    /// A server started: its version, and the audit digest key (by its id, never the key)
    /// that seals the tensor digests of the records after it, and whether that key was made
    /// at this start (a key deleted or replaced beside a trail shows in the trail itself).
    ServerStart,
}

/// How the request ended, as the client saw it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Answered with a prediction.
    Ok,
    /// Refused as malformed or not fitting the model (4xx).
    Rejected,
    /// The model could not take it now (queue or memory budget full: 503).
    Overloaded,
    /// The engine or the server failed (5xx).
    Failed,
    /// The whole-request deadline passed before the answer (408).
    Timeout,
    /// The client went away before the answer.
    ClientGone,
}

impl Outcome {
    /// The outcome of an answered request with this HTTP status.
    pub fn from_status(status: u16) -> Outcome {
        match status {
            200..=299 => Outcome::Ok,
            408 => Outcome::Timeout,
            429 | 503 => Outcome::Overloaded,
            // Answered to nobody: the client went away (a body cut by its client).
            499 => Outcome::ClientGone,
            // 501: something this server does not do, asked for by the caller.
            400..=499 | 501 => Outcome::Rejected,
            _ => Outcome::Failed,
        }
    }
}

/// What the server knows about one request; the store adds sequence, time and chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    pub kind: EventKind,
    pub request_id: String,
    pub model: String,
    pub version: String,
    pub model_sha256: String,
    pub input_sha256: Option<String>,
    pub output_sha256: Option<String>,
    pub rows: Option<usize>,
    /// The HTTP status answered (408 for a deadline, 499 when the client went away).
    pub status: u16,
    pub outcome: Outcome,
    /// Who did it (model-control events): the authenticated caller, `repository-poller`
    /// or `startup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Model-control events: the signature checked, or why a bundle was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The most bytes a text field of a record keeps (a refusal reason may quote whatever a
/// bundle's manifest holds: a 200 KB name made a record no reader of the trail expected).
pub const MAX_FIELD_BYTES: usize = 2048;

/// `text` cut to at most [`MAX_FIELD_BYTES`] on a character boundary, saying how much was
/// cut.
fn bounded(text: &mut String) {
    if text.len() <= MAX_FIELD_BYTES {
        return;
    }
    // Room for the note of what was cut.
    let total = text.len();
    let end = crate::http::error::cut_point(text, MAX_FIELD_BYTES - 64).unwrap_or(total);
    text.truncate(end);
    text.push_str(&format!("... ({} of {total} bytes cut)", total - end));
}

impl AuditEvent {
    /// A record of no model, with no tensors and no detail: outcome `ok`, status 0 (set
    /// what applies).
    pub fn blank(kind: EventKind, request_id: String, actor: Option<String>) -> AuditEvent {
        AuditEvent {
            kind,
            request_id,
            model: String::new(),
            version: String::new(),
            model_sha256: String::new(),
            input_sha256: None,
            output_sha256: None,
            rows: None,
            status: 0,
            outcome: Outcome::Ok,
            actor,
            detail: None,
        }
    }

    /// Cuts every text field to [`MAX_FIELD_BYTES`], so that a record stays a few KiB
    /// whatever it quotes.
    pub fn bound(&mut self) {
        for field in [
            &mut self.request_id,
            &mut self.model,
            &mut self.version,
            &mut self.model_sha256,
        ] {
            bounded(field);
        }
        for field in [
            &mut self.input_sha256,
            &mut self.output_sha256,
            &mut self.actor,
            &mut self.detail,
        ]
        .into_iter()
        .flatten()
        {
            bounded(field);
        }
    }
}

/// One stored record, as read back (the chain fields around the event).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub unix_ms: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev: String,
    pub hash: String,
}

/// The audit trail could not be opened, written or verified.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit database {location}: {source}")]
    Sqlite {
        location: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("audit database {location}: {}", postgres_detail(source))]
    Postgres {
        location: String,
        #[source]
        source: ::postgres::Error,
    },
    #[error("audit trail {location}, record {record}: {reason}")]
    Broken {
        location: String,
        /// Line number in a file (from 1), or sequence number in a database.
        record: u64,
        reason: String,
    },
    #[error(
        "audit trail {location}: its last record {reason}; run `nightingale audit verify` and repair or archive it before appending"
    )]
    BrokenTail { location: String, reason: String },
    #[error("audit trail {location}: {reason}")]
    Write { location: String, reason: String },
    #[error("the audit writer has stopped")]
    Stopped,
    #[error(
        "audit log {path} is in use by another process (it holds the file's lock): a trail has one writer; stop the other server or give this one its own --data-dir / --audit-log"
    )]
    InUse { path: PathBuf },
}

/// The PostgreSQL error with the server's own message ("db error" alone says nothing).
fn postgres_detail(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Where records are kept. A store appends groups atomically (all records of a group, or
/// none, and the chain as stored always verifies) and never decides policy: failing closed is
/// the caller's business.
pub trait AuditStore: Send {
    /// Appends the events, in order, after the chain's last record.
    fn append(&mut self, events: &[&AuditEvent], unix_ms: u64) -> Result<(), AuditError>;
    /// Whether the next append would find the trail as this store left it, without writing
    /// a record: asked by the writer while the trail is failing and nothing is queued, so
    /// that readiness comes back once the trail does (nothing else would append).
    fn check(&mut self) -> Result<(), AuditError> {
        Ok(())
    }
    /// Where the records go, for logs (no secrets).
    fn describe(&self) -> String;
}

/// What a full check of a chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    /// The files checked, oldest first (empty for a database).
    pub files: Vec<PathBuf>,
    /// Sequence number of the first record present (0 unless older files were archived away).
    pub first_seq: Option<u64>,
    pub records: u64,
    pub tail: Option<Tail>,
    /// The record at the sequence number asked for by [`verify_watching`], if present.
    pub watched: Option<Tail>,
    /// The sequence number each file begins at, oldest first (empty for a database, and for
    /// a folder of several logs).
    pub file_starts: Vec<u64>,
}

impl ChainSummary {
    pub fn last_seq(&self) -> Option<u64> {
        self.tail.as_ref().map(|t| t.seq)
    }
}

/// Canonical digest of named tensors: by name, each with datatype, shape and raw little-endian
/// bytes, so the same tensors hash the same whichever wire encoding carried them. The bytes are
/// hashed where they lie, without a copy of the tensor.
pub fn tensors_sha256(tensors: &[NamedTensor]) -> String {
    let mut sorted: Vec<&NamedTensor> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Sha256::new();
    for t in sorted {
        h.update((t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(t.tensor.datatype().as_str().as_bytes());
        h.update((t.tensor.shape().len() as u64).to_le_bytes());
        for &d in t.tensor.shape() {
            h.update((d as u64).to_le_bytes());
        }
        t.tensor.for_each_raw_chunk(|chunk| h.update(chunk));
    }
    hex::encode(h.finalize())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type Ack = oneshot::Sender<Result<(), String>>;
type Job = (AuditEvent, Option<Ack>);

/// Most records appended in one group.
const MAX_GROUP: usize = 1024;

/// The deployment's secret key for the digests of tensors in audit records.
///
/// `input_sha256` and `output_sha256` are digests of patient data: a tabular model's inputs
/// are a handful of small-range values (age, blood pressure, heart rate), and a plain SHA-256
/// of them was turned back into the patient's values by trying every combination (12 M tries,
/// 12 s on one core: a red-team finding). With a key, a record holds
/// HMAC-SHA256(key, the hex of the canonical SHA-256): an auditor holding the key and the
/// request recomputes it; without the key no guess can be tested.
#[derive(Clone)]
pub struct DigestKey([u8; 32]);

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DigestKey({})", self.id())
    }
}

impl DigestKey {
    pub fn from_bytes(bytes: [u8; 32]) -> DigestKey {
        DigestKey(bytes)
    }

    /// The key in `path` (64 hex digits), made there (mode 0600, 32 random bytes) when
    /// nothing is there. Refused: a path that is not a regular file (a FIFO blocked the start
    /// for ever; a link to nothing recursed until the stack overflowed: red-team findings)
    /// and a file that holds no key. A key readable by others than its owner is taken with a
    /// warning in the log.
    pub fn load_or_create(path: &Path) -> std::io::Result<DigestKey> {
        use std::io::{Error, ErrorKind};
        match std::fs::symlink_metadata(path) {
            Ok(_) => DigestKey::load(path),
            Err(e) if e.kind() == ErrorKind::NotFound => match DigestKey::create(path) {
                // Made by another process meanwhile: that one is the key.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => DigestKey::load(path),
                made => made,
            },
            Err(e) => Err(Error::new(e.kind(), format!("cannot be looked at: {e}"))),
        }
    }

    fn load(path: &Path) -> std::io::Result<DigestKey> {
        use std::io::{Error, ErrorKind};
        let invalid = |why: &str| {
            Error::new(
                ErrorKind::InvalidData,
                format!("{why}: an audit digest key is a file of 64 hex digits"),
            )
        };
        let bytes = crate::files::read_regular(path, 4096).map_err(|e| match e.kind() {
            // The path itself is there (the caller looked): a link to nothing.
            ErrorKind::NotFound => invalid("a link to nothing"),
            ErrorKind::InvalidInput | ErrorKind::InvalidData => invalid(&e.to_string()),
            _ => e,
        })?;
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the audit digest key can be read by others than its owner: chmod 600 it"
                );
            }
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not text"))?;
        let bytes = hex::decode(text.trim()).map_err(|_| invalid("not hex"))?;
        if text.trim().is_empty() {
            return Err(invalid(
                "empty (left by a start that failed while making it, so no record was sealed \
                 with it): delete it, and a new key is made at the next start",
            ));
        }
        let key: [u8; 32] = bytes.try_into().map_err(|_| invalid("not 32 bytes"))?;
        Ok(DigestKey(key))
    }

    /// Written whole to a temporary file beside `path`, synced, then linked in as `path`
    /// (which fails where something is there already, as `create_new` would) and the folder
    /// synced: `path` is never seen empty or cut (a disk full at the first start left an
    /// empty key, and every later start was refused: a review's finding).
    fn create(path: &Path) -> std::io::Result<DigestKey> {
        use std::io::Write as _;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
        let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                dir
            }
            None => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "names no file")
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        let written = (|| {
            // This process's own name: one left by a crash is written over (a link in its
            // place is not followed).
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                std::os::unix::fs::OpenOptionsExt::custom_flags(
                    &mut options,
                    rustix::fs::OFlags::NOFOLLOW.bits() as i32,
                );
            }
            let mut f = options.open(&tmp)?;
            f.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        written?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(DigestKey(key))
    }

    /// A short public name of the key (the first 16 hex digits of its SHA-256), for logs.
    pub fn id(&self) -> String {
        hex::encode(Sha256::digest(self.0))[..16].to_owned()
    }

    /// HMAC-SHA256 under this key of a digest's text, as hex.
    pub fn seal(&self, digest: &str) -> String {
        use hmac::Mac as _;
        let mut mac =
            hmac::Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(digest.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// Handle to the audit writer thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    location: String,
    /// False while the trail cannot be written (the last append failed, and no check since
    /// found it writable): readiness answers 503, as every request would be refused.
    writable: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// When the writer began the store call it is in (Unix ms), 0 when it is in none: a call
    /// that has run longer than [`STALLED`] makes the trail not writable (a PostgreSQL server
    /// that stopped answering held every write, readiness 200: a review's finding).
    busy_since: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Seals the tensor digests of every record ([`DigestKey`]); None: plain SHA-256.
    key: Option<std::sync::Arc<DigestKey>>,
    /// Where DICOM records go while the trail cannot be written ([`held`]).
    held: Option<std::sync::Arc<held::Held>>,
}

impl AuditLog {
    /// A JSON-lines log at `path` with the default rotation size.
    pub fn open(path: &Path, fsync: bool) -> Result<AuditLog, AuditError> {
        let store = jsonl::JsonLinesStore::open(
            path,
            jsonl::Options {
                fsync,
                ..jsonl::Options::default()
            },
        )?;
        AuditLog::start(Box::new(store))
    }

    /// Starts the writer thread over a store.
    pub fn start(store: Box<dyn AuditStore>) -> Result<AuditLog, AuditError> {
        let location = store.describe();
        let (tx, rx) = mpsc::channel::<Job>(4096);
        let writable = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let busy_since = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (flag, busy) = (writable.clone(), busy_since.clone());
        std::thread::Builder::new()
            .name("ng-audit".into())
            .spawn(move || run_writer(store, rx, &flag, &busy))
            .map_err(|source| AuditError::Io {
                path: PathBuf::from(&location),
                source,
            })?;
        Ok(AuditLog {
            tx,
            location,
            writable,
            busy_since,
            key: None,
            held: None,
        })
    }

    /// Whether records can be written now: false from a failed append until an append, or
    /// the writer's check while nothing is queued (every [`CHECK_INTERVAL`]), succeeds.
    pub fn is_writable(&self) -> bool {
        use std::sync::atomic::Ordering;
        let since = self.busy_since.load(Ordering::Acquire);
        let stalled = since != 0 && unix_ms().saturating_sub(since) > STALLED.as_millis() as u64;
        self.writable.load(Ordering::Acquire) && !stalled
    }

    /// The same log, sealing the tensor digests of every record it is given from now on with
    /// `key` ([`DigestKey`]).
    pub fn with_digest_key(mut self, key: DigestKey) -> AuditLog {
        self.key = Some(std::sync::Arc::new(key));
        self
    }

    /// The same log, holding the DICOM records it cannot write in `held` until it can
    /// ([`AuditLog::record_or_hold`]; [`held::Held::replay_forever`] writes them).
    pub fn with_held(mut self, held: std::sync::Arc<held::Held>) -> AuditLog {
        self.held = Some(held);
        self
    }

    /// The held DICOM records, if this log holds them.
    pub fn held(&self) -> Option<&std::sync::Arc<held::Held>> {
        self.held.as_ref()
    }

    /// Appends a DICOM record and waits until it is stored: in the trail, or, while the trail
    /// cannot be written (or records are held already, which keeps their order), in the held
    /// records ([`held`]), fsynced. Without held records, as [`AuditLog::record`].
    ///
    /// A trail that does not answer within [`TRAIL_WAIT`] counts as failing: the record is
    /// held (the trail may still take it once it answers: the record is then in it twice,
    /// the second copy marked `held_at_ms`). The digests are sealed before a record is held:
    /// the held file keeps what the trail will.
    pub async fn record_or_hold(&self, event: AuditEvent) -> Result<(), AuditError> {
        let Some(held) = &self.held else {
            return self.record(event).await;
        };
        let event = self.sealed(event);
        // Behind the records held already, while there are some (`false`: the last of them
        // reached the trail meanwhile).
        if held.is_active() && held.hold(event.clone(), false).await? {
            return Ok(());
        }
        match tokio::time::timeout(TRAIL_WAIT, self.record_sealed(event.clone())).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "audit record not written: held for the trail");
            }
            Err(_) => tracing::error!(
                wait_s = TRAIL_WAIT.as_secs(),
                "the audit trail did not answer: the record is held for it"
            ),
        }
        held.hold(event, true).await.map(|_| ())
    }

    /// [`AuditLog::record_or_hold`] on a thread that may block (the blocking pool, never an
    /// async worker): what stores a received instance records it in the same task, so that
    /// an HTTP request cut short (its deadline, the end of the shutdown grace) cannot leave
    /// an instance stored without its record (a review's finding: a STOW-RS answered 408
    /// left instances in the spool, served by QIDO/WADO, with no record).
    pub fn record_or_hold_blocking(&self, event: AuditEvent) -> Result<(), AuditError> {
        use tokio::sync::oneshot::error::TryRecvError;
        let event = self.sealed(event);
        if let Some(held) = &self.held
            && held.is_active()
            && held.hold_now(&event, false)?
        {
            return Ok(());
        }
        let (ack, mut done) = oneshot::channel();
        self.tx
            .blocking_send((event.clone(), Some(ack)))
            .map_err(|_| AuditError::Stopped)?;
        let started = Instant::now();
        let mut pause = std::time::Duration::from_micros(50);
        let answer = loop {
            match done.try_recv() {
                Ok(answer) => break Some(answer),
                Err(TryRecvError::Closed) => return Err(AuditError::Stopped),
                Err(TryRecvError::Empty) => {
                    if self.held.is_some() && started.elapsed() >= TRAIL_WAIT {
                        break None;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(2));
                }
            }
        };
        let error = match answer {
            Some(Ok(())) => return Ok(()),
            Some(Err(reason)) => AuditError::Write {
                location: self.location.clone(),
                reason,
            },
            None => AuditError::Write {
                location: self.location.clone(),
                reason: format!("no answer within {} s", TRAIL_WAIT.as_secs()),
            },
        };
        let Some(held) = &self.held else {
            return Err(error);
        };
        tracing::error!(error = %error, "audit record not written: held for the trail");
        held.hold_now(&event, true).map(|_| ())
    }

    /// Writes a held record (sealed when it was held) to the trail.
    pub(crate) async fn record_held(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.record_sealed(event).await
    }

    /// The record as it is stored: its tensor digests sealed under the key, if any.
    fn sealed(&self, mut event: AuditEvent) -> AuditEvent {
        if let Some(key) = &self.key {
            for digest in [&mut event.input_sha256, &mut event.output_sha256]
                .into_iter()
                .flatten()
            {
                *digest = key.seal(digest);
            }
        }
        event
    }

    /// Where records go (for logs).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Appends a record and waits until it is stored.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.record_sealed(self.sealed(event)).await
    }

    /// [`AuditLog::record`] of a record whose digests are sealed already.
    async fn record_sealed(&self, event: AuditEvent) -> Result<(), AuditError> {
        let permit = self.tx.reserve().await.map_err(|_| AuditError::Stopped)?;
        let (ack, done) = oneshot::channel();
        permit.send((event, Some(ack)));
        self.wait(done).await
    }

    async fn wait(&self, done: oneshot::Receiver<Result<(), String>>) -> Result<(), AuditError> {
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(AuditError::Write {
                location: self.location.clone(),
                reason,
            }),
            Err(_) => Err(AuditError::Stopped),
        }
    }

    /// Starts the record of a request that has reached a model; see [`PendingRecord`].
    pub fn pending(&self, event: AuditEvent, deadline: Option<Instant>) -> PendingRecord {
        PendingRecord {
            log: self.clone(),
            event: Some(event),
            deadline,
        }
    }

    /// Queues a record without waiting for it (for drop paths, which cannot wait).
    fn submit_detached(&self, event: AuditEvent) {
        match self.tx.try_send((self.sealed(event), None)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                let tx = self.tx.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(async move {
                            if tx.send(job).await.is_err() {
                                tracing::error!("audit writer stopped; a record was lost");
                            }
                        });
                    }
                    Err(_) => {
                        if tx.blocking_send(job).is_err() {
                            tracing::error!("audit writer stopped; a record was lost");
                        }
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit writer stopped; a record was lost");
            }
        }
    }
}

tokio::task_local! {
    /// Set by [`PendingRecord::commit`] just before its record goes to the writer, inside
    /// [`within_deadline`]: from then on the answer is the one recorded.
    static COMMITTING: std::sync::Arc<std::sync::atomic::AtomicBool>;
}

/// How long [`within_deadline`] waits past the deadline for a record already on its way.
const COMMIT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs a request's handler until `deadline`; `None` when the deadline fired first. A
/// handler whose audit record was already sent to the writer when the deadline fired is not
/// cut off: it is awaited (up to 30 s more) and its answer given, since the record says it
/// was (a red-team finding: records said 200 "ok" for calls answered DEADLINE_EXCEEDED).
pub async fn within_deadline<F: std::future::Future>(
    deadline: tokio::time::Instant,
    handler: F,
) -> Option<F::Output> {
    let committing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = COMMITTING.scope(committing.clone(), handler);
    tokio::pin!(handler);
    tokio::select! {
        out = &mut handler => Some(out),
        _ = tokio::time::sleep_until(deadline) => {
            if committing.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::timeout(COMMIT_GRACE, handler).await.ok()
            } else {
                None
            }
        }
    }
}

/// The audit record of a request that has reached a model, until it is committed.
///
/// The handler fills in what it learns ([`PendingRecord::event_mut`]) and commits the record
/// with the status it answers before answering. If the handler is dropped first — its
/// deadline fired, or the client went away — the record is written on drop with outcome
/// `timeout` (status 408) when the deadline had passed, else `client-gone` (499): a request
/// that reached a model is audited whatever happens on the HTTP side.
#[derive(Debug)]
pub struct PendingRecord {
    log: AuditLog,
    event: Option<AuditEvent>,
    deadline: Option<Instant>,
}

impl PendingRecord {
    pub fn event_mut(&mut self) -> &mut AuditEvent {
        self.event
            .as_mut()
            .expect("a pending record holds its event until committed")
    }

    /// The request's deadline, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Stores the record with the status about to be answered, and waits until it is stored.
    pub async fn commit(mut self, status: u16) -> Result<(), AuditError> {
        // Reserve a slot first: if this future is dropped while waiting for room, the event
        // is still here and the drop path records it.
        let permit = self
            .log
            .tx
            .reserve()
            .await
            .map_err(|_| AuditError::Stopped)?;
        let mut event = self.event.take().expect("committed once");
        event.status = status;
        event.outcome = Outcome::from_status(status);
        let (ack, done) = oneshot::channel();
        // From here the record says `status`: the request's deadline no longer cuts it off.
        let _ = COMMITTING.try_with(|c| c.store(true, std::sync::atomic::Ordering::SeqCst));
        permit.send((self.log.sealed(event), Some(ack)));
        self.log.wait(done).await
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        let timed_out = self.deadline.is_some_and(|d| Instant::now() >= d);
        (event.status, event.outcome) = if timed_out {
            (408, Outcome::Timeout)
        } else {
            (499, Outcome::ClientGone)
        };
        tracing::info!(outcome = ?event.outcome, "request dropped before its answer; audited");
        self.log.submit_detached(event);
    }
}

/// Detached records (requests whose deadline fired or whose client left after reaching the
/// model) kept for another try when their group could not be written: nobody waits for
/// them, so they are written with the next group instead of lost. Beyond this many the
/// oldest are given up (counted in `nightingale_audit_lost_records_total`).
const MAX_RETRIED: usize = 65_536;
/// How long the writer waits for company before it tries the kept records again alone.
const RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// How often a failing trail with nothing to write is checked ([`AuditStore::check`]).
const CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// A store call running longer than this makes the trail not writable ([`AuditLog::is_writable`]).
const STALLED: std::time::Duration = std::time::Duration::from_secs(5);
/// How long [`AuditLog::record_or_hold`] waits for the trail before it holds a record.
pub const TRAIL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn run_writer(
    mut store: Box<dyn AuditStore>,
    mut rx: mpsc::Receiver<Job>,
    writable: &std::sync::atomic::AtomicBool,
    busy_since: &std::sync::atomic::AtomicU64,
) {
    use std::sync::atomic::Ordering;
    let mut retry: std::collections::VecDeque<AuditEvent> = std::collections::VecDeque::new();
    loop {
        let mut group: Vec<Job> = retry.drain(..).map(|e| (e, None)).collect();
        if group.is_empty() && !writable.load(Ordering::Acquire) {
            // Failing, and nothing kept: a balancer that reads readiness sends nothing more,
            // so the trail is checked here until it can be written again.
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(CHECK_INTERVAL);
                    busy_since.store(unix_ms(), Ordering::Release);
                    let checked = store.check();
                    busy_since.store(0, Ordering::Release);
                    if checked.is_ok() {
                        tracing::info!("the audit trail can be written again: ready");
                        writable.store(true, Ordering::Release);
                    }
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        } else if group.is_empty() {
            match rx.blocking_recv() {
                Some(job) => group.push(job),
                None => return,
            }
        } else {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(RETRY_INTERVAL),
                // Shutting down: one last try for the kept records.
                Err(mpsc::error::TryRecvError::Disconnected) => {}
            }
        }
        let limit = group.len() + MAX_GROUP;
        while group.len() < limit {
            match rx.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        for (event, _) in group.iter_mut() {
            event.bound();
        }
        let events: Vec<&AuditEvent> = group.iter().map(|(e, _)| e).collect();
        let now = unix_ms();
        busy_since.store(now, Ordering::Release);
        let result = store.append(&events, now);
        busy_since.store(0, Ordering::Release);
        match &result {
            Ok(()) => {
                metrics::counter!("nightingale_audit_records_total").increment(group.len() as u64)
            }
            Err(e) => {
                metrics::counter!("nightingale_audit_write_failures_total").increment(1);
                tracing::error!(error = %e, records = group.len(), "cannot write the audit trail");
            }
        }
        let failed = result.is_err();
        writable.store(!failed, Ordering::Release);
        let answer = result.map_err(|e| e.to_string());
        for (event, ack) in group {
            match ack {
                Some(ack) => {
                    let _ = ack.send(answer.clone());
                }
                None if failed => retry.push_back(event),
                None => {}
            }
        }
        while retry.len() > MAX_RETRIED {
            retry.pop_front();
            metrics::counter!("nightingale_audit_lost_records_total").increment(1);
            tracing::error!(
                "the audit trail has been failing too long: a kept record was given up"
            );
        }
        if failed && rx.is_closed() && rx.is_empty() {
            if !retry.is_empty() {
                tracing::error!(
                    records = retry.len(),
                    "the audit writer stops with records it could not write"
                );
                metrics::counter!("nightingale_audit_lost_records_total")
                    .increment(retry.len() as u64);
            }
            return;
        }
    }
}

/// The tail of a database store from its last row `(seq, record)`, checked against its hash.
fn checked_tail(location: &str, row: Option<(i64, String)>) -> Result<Option<Tail>, AuditError> {
    let Some((seq, record)) = row else {
        return Ok(None);
    };
    let broken = |reason: String| AuditError::BrokenTail {
        location: location.to_owned(),
        reason,
    };
    let (record_seq, _, hash) = chain::check_line(&record).map_err(broken)?;
    if u64::try_from(seq).ok() != Some(record_seq) {
        return Err(broken(format!(
            "is stored as sequence {seq} but says {record_seq}"
        )));
    }
    Ok(Some(Tail {
        seq: record_seq,
        hash,
    }))
}

/// Checks one database row: the record, and that its key columns agree with it.
fn check_row(
    location: &str,
    checker: &mut chain::ChainChecker,
    seq: i64,
    hash: &str,
    record: &str,
) -> Result<(), AuditError> {
    let broken = |reason: String| AuditError::Broken {
        location: location.to_owned(),
        record: u64::try_from(seq).unwrap_or_default(),
        reason,
    };
    checker.push(record).map_err(broken)?;
    let tail = checker.tail.as_ref().expect("just pushed");
    if u64::try_from(seq).ok() != Some(tail.seq) || hash != tail.hash {
        return Err(broken(
            "the row's seq/hash columns disagree with its record".into(),
        ));
    }
    Ok(())
}

/// Checks a whole chain: a JSON-lines file or folder, or an SQLite database (by its header).
pub fn verify(path: &Path) -> Result<ChainSummary, AuditError> {
    verify_watching(path, None)
}

/// [`verify`], also keeping the record at sequence number `watch` (an anchor's).
pub fn verify_watching(path: &Path, watch: Option<u64>) -> Result<ChainSummary, AuditError> {
    verify_watching_archived(path, watch, false)
}

/// [`verify_watching`]; with `archived`, a JSON-lines trail whose rotated files were all
/// archived away on purpose is checked from where its live file starts
/// ([`jsonl::verify_watching_archived`]).
pub fn verify_watching_archived(
    path: &Path,
    watch: Option<u64>,
    archived: bool,
) -> Result<ChainSummary, AuditError> {
    // Neither a file nor a folder (a FIFO, a device): refused before it is opened, since
    // opening a FIFO to read waits for a writer, forever.
    if let Ok(m) = std::fs::metadata(path)
        && !m.is_file()
        && !m.is_dir()
    {
        return Err(AuditError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or a folder: an audit trail is one",
            ),
        });
    }
    if sqlite::is_sqlite(path) {
        sqlite::verify_watching(path, watch)
    } else {
        jsonl::verify_watching_archived(path, watch, archived)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A store that takes `delay` to append, and keeps (status, request id) of what it got.
    struct Slow {
        delay: std::time::Duration,
        written: Arc<std::sync::Mutex<Vec<(u16, String)>>>,
    }

    impl AuditStore for Slow {
        fn append(&mut self, events: &[&AuditEvent], _: u64) -> Result<(), AuditError> {
            std::thread::sleep(self.delay);
            let mut w = self.written.lock().unwrap();
            w.extend(events.iter().map(|e| (e.status, e.request_id.clone())));
            Ok(())
        }

        fn describe(&self) -> String {
            "slow".into()
        }
    }

    /// A record on its way to the writer when the deadline fires is not cut off: the handler
    /// is awaited and its answer given, as the record says (a red-team finding: records said
    /// 200 for calls answered DEADLINE_EXCEEDED); a handler that had not committed is cut
    /// off, and its record says 408.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deadline_does_not_cut_off_a_record_on_its_way() {
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = AuditLog::start(Box::new(Slow {
            delay: std::time::Duration::from_millis(300),
            written: written.clone(),
        }))
        .unwrap();
        let soon = || tokio::time::Instant::now() + std::time::Duration::from_millis(50);
        let deadline = soon();
        let pending = log.pending(event("committed"), Some(deadline.into_std()));
        let answered = within_deadline(deadline, async move {
            pending.commit(200).await.unwrap();
            "answer"
        })
        .await;
        assert_eq!(answered, Some("answer"));
        let deadline = soon();
        let pending = log.pending(event("cut-off"), Some(deadline.into_std()));
        let answered = within_deadline(deadline, async move {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            pending.commit(200).await.unwrap();
            "late"
        })
        .await;
        assert_eq!(answered, None);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while written.lock().unwrap().len() < 2 {
            assert!(std::time::Instant::now() < until, "records not written");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            *written.lock().unwrap(),
            [(200, "committed".to_owned()), (408, "cut-off".to_owned())]
        );
    }

    #[test]
    fn a_digest_key_is_made_once_private_and_refused_when_malformed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("audit-digest.key");
        let made = DigestKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        // Made beside and linked in whole: nothing else is left in the folder.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["audit-digest.key"]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 65);
        let again = DigestKey::load_or_create(&path).unwrap();
        assert_eq!(made.seal("abc"), again.seal("abc"));
        assert_eq!(made.id(), again.id());
        // Keyed: another key seals the same digest otherwise; the seal is 64 hex digits.
        let other = DigestKey::from_bytes([7; 32]);
        assert_ne!(made.seal("abc"), other.seal("abc"));
        assert_eq!(other.seal("abc").len(), 64);
        // The key is not shown by Debug.
        assert!(!format!("{made:?}").contains(&hex::encode(made.0)));
        for bad in ["", "zz", &"ab".repeat(31), &"ab".repeat(33)] {
            std::fs::write(&path, bad).unwrap();
            let e = DigestKey::load_or_create(&path).unwrap_err().to_string();
            assert!(e.contains("64 hex digits"), "{bad:?}: {e}");
        }
        // An empty key (left by an older start that failed while writing it) says what to do.
        std::fs::write(&path, "").unwrap();
        let e = DigestKey::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("delete it"), "{e}");
        // A link to nothing, a folder, a FIFO: refused at once (a link to nothing recursed
        // until the stack overflowed, a FIFO blocked for ever).
        let dangling = dir.path().join("dangling.key");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let fifo = dir.path().join("fifo.key");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        for (bad, why) in [
            (dangling, "a link to nothing"),
            (dir.path().to_owned(), "not a regular file"),
            (fifo, "not a regular file"),
        ] {
            let e = DigestKey::load_or_create(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{}: {e}", bad.display());
        }
        // A link to a key is followed.
        std::fs::write(&path, format!("{}\n", "0f".repeat(32))).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(
            DigestKey::load_or_create(&link).unwrap().seal("x"),
            DigestKey::from_bytes([0x0f; 32]).seal("x")
        );
    }

    /// A store that fails while `failing` is set and keeps what it was given otherwise.
    struct Flaky {
        failing: Arc<std::sync::atomic::AtomicBool>,
        written: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl AuditStore for Flaky {
        fn append(&mut self, events: &[&AuditEvent], _: u64) -> Result<(), AuditError> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(AuditError::Stopped);
            }
            let mut w = self.written.lock().unwrap();
            w.extend(events.iter().map(|e| e.request_id.clone()));
            Ok(())
        }

        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn event(id: &str) -> AuditEvent {
        AuditEvent {
            kind: EventKind::Inference,
            request_id: id.into(),
            model: "m".into(),
            version: "1".into(),
            model_sha256: String::new(),
            input_sha256: None,
            output_sha256: None,
            rows: Some(1),
            status: 200,
            outcome: Outcome::Ok,
            actor: None,
            detail: None,
        }
    }

    #[test]
    fn text_fields_are_cut_on_a_character_boundary() {
        let mut e = event("r");
        // A two-byte character across the cut.
        e.detail = Some(format!(
            "{}é{}",
            "n".repeat(MAX_FIELD_BYTES - 65),
            "n".repeat(200_000)
        ));
        e.model = "m".repeat(300_000);
        e.bound();
        let detail = e.detail.unwrap();
        assert!(detail.len() <= MAX_FIELD_BYTES, "{}", detail.len());
        assert!(
            detail.ends_with(" bytes cut)"),
            "{}",
            &detail[detail.len() - 40..]
        );
        assert!(e.model.len() <= MAX_FIELD_BYTES);
        // Short fields are left as they are.
        let mut short = event("r");
        short.detail = Some("signature ok".into());
        short.bound();
        assert_eq!(short.detail.as_deref(), Some("signature ok"));
        assert_eq!(short.model, "m");
    }

    /// Red-team finding: the trail's folder and files were created readable by every local
    /// user (0755 / 0644 under the usual umask).
    #[test]
    fn a_new_trail_is_its_owners_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let path = dir.path().join("audit").join("audit.jsonl");
        drop(jsonl::JsonLinesStore::open(&path, jsonl::Options::default()).unwrap());
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        let db = dir.path().join("db").join("audit.sqlite3");
        drop(sqlite::SqliteStore::open(&db, false).unwrap());
        assert_eq!(mode(db.parent().unwrap()), 0o700);
        assert_eq!(mode(&db), 0o600);
    }

    /// Red-team finding: two servers on one data folder (or `validate --audit-log` at a live
    /// server's file) appended to one trail at once and forked its hash chain. A trail now
    /// has one writer: the second open is refused while the first is open.
    #[test]
    fn a_trail_has_one_writer_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let first = jsonl::JsonLinesStore::open(&path, jsonl::Options::default()).unwrap();
        let e = jsonl::JsonLinesStore::open(&path, jsonl::Options::default()).unwrap_err();
        assert!(matches!(e, AuditError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("in use by another process"), "{e}");
        // Nor through another name of the same file (a symbolic or a hard link).
        let symbolic = dir.path().join("alias.jsonl");
        std::os::unix::fs::symlink(&path, &symbolic).unwrap();
        let hard = dir.path().join("hard.jsonl");
        std::fs::hard_link(&path, &hard).unwrap();
        for alias in [&symbolic, &hard] {
            let e = jsonl::JsonLinesStore::open(alias, jsonl::Options::default()).unwrap_err();
            assert!(matches!(e, AuditError::InUse { .. }), "{alias:?}: {e}");
        }
        drop(first);
        jsonl::JsonLinesStore::open(&path, jsonl::Options::default()).unwrap();
        assert!(verify(&path).is_ok());
        // A rotated file's name is refused as a trail to append to (it is sealed).
        let rotated = dir.path().join("audit.00000000000000000001.jsonl");
        std::fs::write(&rotated, b"").unwrap();
        let e = jsonl::JsonLinesStore::open(&rotated, jsonl::Options::default()).unwrap_err();
        assert!(e.to_string().contains("rotated (sealed)"), "{e}");
        // The SQLite store too (a second server on one database was not refused: the first
        // then failed every request closed; a red-team finding).
        let db = dir.path().join("audit.sqlite3");
        let first = sqlite::SqliteStore::open(&db, false).unwrap();
        let e = sqlite::SqliteStore::open(&db, false).unwrap_err();
        assert!(matches!(e, AuditError::InUse { .. }), "{e}");
        let symbolic = dir.path().join("alias.sqlite3");
        std::os::unix::fs::symlink(&db, &symbolic).unwrap();
        let e = sqlite::SqliteStore::open(&symbolic, false).unwrap_err();
        assert!(matches!(e, AuditError::InUse { .. }), "{e}");
        drop(first);
        sqlite::SqliteStore::open(&db, false).unwrap();
    }

    /// A trail whose records are longer than the first read of a file's end (written before
    /// records were bounded: a 200 KB refusal reason) still opens, continues its chain and
    /// rotates; the server used to refuse to start on it.
    #[test]
    fn a_trail_with_records_longer_than_the_tail_read_opens_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let options = jsonl::Options {
            fsync: false,
            rotate_bytes: 64 << 10,
        };
        let mut long = event("long");
        long.detail = Some(format!("{}é", "N".repeat(200_000)));
        {
            let mut store = jsonl::JsonLinesStore::open(&path, options.clone()).unwrap();
            store.append(&[&long], 1).unwrap();
        }
        // Twice: the long record last in the live file, then first in it at rotation.
        for id in ["after-1", "after-2"] {
            let mut store = jsonl::JsonLinesStore::open(&path, options.clone()).unwrap();
            store.append(&[&event(id)], 2).unwrap();
        }
        let summary = verify(&path).unwrap();
        assert_eq!(summary.records, 3);
        assert_eq!(summary.files.len(), 2, "{:?}", summary.files);
        // A torn long last line (no line end) is set aside, the chain goes on from the record
        // before it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, "x".repeat(300_000).as_bytes()).unwrap();
        drop(f);
        let mut store = jsonl::JsonLinesStore::open(&path, options).unwrap();
        store.append(&[&event("after-3")], 3).unwrap();
        assert_eq!(verify(&path).unwrap().records, 4);
    }

    /// An empty rotated file beside the live one (the server never writes one: rotation
    /// needs a first record to name the file) is reported, not read as "older files are not
    /// here" (red team).
    #[test]
    fn an_empty_rotated_file_is_a_broken_trail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut store = jsonl::JsonLinesStore::open(&path, jsonl::Options::default()).unwrap();
        store.append(&[&event("a"), &event("b")], 1).unwrap();
        assert_eq!(verify(&path).unwrap().records, 2);
        let empty = dir.path().join("audit.00000000000000000000.jsonl");
        std::fs::write(&empty, "").unwrap();
        let e = verify(&path).unwrap_err().to_string();
        assert!(e.contains("a rotated file with no record"), "{e}");
    }

    /// A record nobody waits for (a request whose client left after it reached the model)
    /// is not lost when its group fails: it is written once the store takes writes again,
    /// with or without other records to write; a waited-for record gets the error.
    #[tokio::test]
    async fn detached_records_of_a_failed_group_are_written_later() {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let written = Arc::new(std::sync::Mutex::new(vec![]));
        let log = AuditLog::start(Box::new(Flaky {
            failing: failing.clone(),
            written: written.clone(),
        }))
        .unwrap();
        log.submit_detached(event("gone-1"));
        assert!(log.record(event("waited")).await.is_err());
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        // No other record comes: the kept one is written on its own, within a bound.
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !written.lock().unwrap().contains(&"gone-1".to_owned()) {
            assert!(
                Instant::now() < deadline,
                "the kept record was never written"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        log.record(event("next")).await.unwrap();
        let w = written.lock().unwrap().clone();
        assert_eq!(w, vec!["gone-1".to_owned(), "next".to_owned()]);
    }

    #[test]
    fn tensor_digest_ignores_order_but_not_content() {
        use nightingale_inference::Tensor;
        let a = NamedTensor::new("a", Tensor::from_vec(vec![2], vec![1.0f32, 2.0]).unwrap());
        let b = NamedTensor::new("b", Tensor::from_vec(vec![1], vec![7i64]).unwrap());
        assert_eq!(
            tensors_sha256(&[a.clone(), b.clone()]),
            tensors_sha256(&[b.clone(), a.clone()])
        );
        let a2 = NamedTensor::new(
            "a",
            Tensor::from_vec(vec![1, 2], vec![1.0f32, 2.0]).unwrap(),
        );
        assert_ne!(tensors_sha256(&[a, b.clone()]), tensors_sha256(&[a2, b]));
    }

    #[test]
    fn digest_streams_the_wire_layout() {
        use nightingale_inference::Tensor;
        // The bytes hashed are Triton's binary layout, written out here element by element.
        let f: Vec<f32> = (0..5000).map(|i| i as f32 * 0.25).collect();
        let cases: Vec<(Tensor, Vec<u8>)> = vec![
            (
                Tensor::from_vec(vec![3], vec![true, false, true]).unwrap(),
                vec![1, 0, 1],
            ),
            (
                Tensor::from_vec(vec![2, 2], vec![1i64, -2, 3, i64::MIN]).unwrap(),
                [1i64, -2, 3, i64::MIN]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            (
                Tensor::from_vec(vec![2], vec![half::f16::from_f32(0.5), half::f16::MAX]).unwrap(),
                vec![0x00, 0x38, 0xff, 0x7b],
            ),
            (
                Tensor::from_vec(vec![2], vec![b"ab".to_vec(), vec![]]).unwrap(),
                vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0],
            ),
            (
                Tensor::from_vec(vec![5000], f.clone()).unwrap(),
                f.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        ];
        for (t, expected) in cases {
            let mut streamed = vec![];
            t.for_each_raw_chunk(|c| streamed.extend_from_slice(c));
            assert_eq!(streamed, expected, "{}", t.datatype());
            assert_eq!(t.raw_len(), expected.len());
        }
        // A transposed (non-contiguous) tensor streams in logical row-major order.
        let a = ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0]])
            .reversed_axes()
            .into_dyn();
        let t = Tensor::Fp32(a);
        let mut streamed = vec![];
        t.for_each_raw_chunk(|c| streamed.extend_from_slice(c));
        let expected: Vec<u8> = [1.0f32, 3.0, 2.0, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(streamed, expected);
    }
}
