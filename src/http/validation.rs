//! Validation runs over HTTP (issue 11, role `researcher`): `POST /validation/runs` starts
//! `nightingale validate` on a dataset uploaded in the body (`text/csv`, streamed to disk with
//! a size cap) or named under the server's `--validation-root` (JSON), `GET
//! /validation/runs/{id}` says how far it is, and `GET /validation/runs/{id}/report.json` /
//! `report.html` serve the report, `GET /validation/runs` lists the caller's runs. One run at
//! a time per model; the run loads its own copy of the bundle from the served repository
//! (same verification, same engine) so serving is never touched, and its predictions go to
//! the server's audit trail. Each run keeps its record, `run.json`, in its folder beside its
//! report: runs are listed and their reports served after a restart.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::AppState;
use super::auth::Caller;
use super::error::AppError;
use crate::validate::{PathRefused, RunContext, RunProgress, ValidateCommand, path_under};

/// Runs kept in memory per owner (the owner's oldest finished ones are forgotten first; their
/// reports stay on disk): one researcher's many runs cannot push another's out of reach (a
/// red-team finding, with one cap over all owners).
const KEPT_RUNS: usize = 256;

/// Runs kept in memory over all owners.
const KEPT_RUNS_IN_ALL: usize = 4096;

/// Runs whose threads may work at once, cancelled and stopped ones included (a stopped
/// run's thread ends at its next row or bootstrap replicate, and what it holds goes with
/// it): cancelling and starting again cannot stack them without bound.
pub const MAX_WORKING_RUNS: usize = 4;

/// How long a validation run may take by default (`--validation-max-run-secs`): four hours.
pub const DEFAULT_MAX_RUN: std::time::Duration = std::time::Duration::from_secs(4 * 3600);

/// The validation service of a server.
pub struct Validation {
    /// Where server-side datasets may be named from (`None`: uploads only).
    pub root: Option<PathBuf>,
    /// `<data-dir>/validation/runs`.
    pub runs_dir: PathBuf,
    pub max_upload_bytes: u64,
    /// The engine and signature policy runs load with (the server's).
    pub options: nightingale_models::RepositoryOptions,
    /// How long a run may take before it is stopped (`--validation-max-run-secs`).
    pub max_run: std::time::Duration,
    runs: Mutex<HashMap<String, Arc<Run>>>,
    order: Mutex<Vec<String>>,
    /// Runs whose threads have not ended.
    working: Arc<std::sync::atomic::AtomicUsize>,
    /// Uploads being received (each to its own run folder, up to `max_upload_bytes`).
    uploading: Arc<std::sync::atomic::AtomicUsize>,
    /// ... of them, per caller ([`MAX_UPLOADS_PER_CALLER`]).
    uploaders: Arc<Mutex<HashMap<String, usize>>>,
}

/// Uploads received at once, over all callers: what waits on disk for a run is bounded by
/// this many times the upload cap (20 concurrent uploads of a model that does not exist
/// were all stored before their 404).
const MAX_UPLOADS: usize = MAX_WORKING_RUNS;

/// Uploads one caller may have received at once: one researcher trickling four uploads a
/// byte at a time held every place until the request deadline, over and over, and
/// everyone else's upload was refused (a review's finding).
const MAX_UPLOADS_PER_CALLER: usize = if MAX_UPLOADS > 2 { MAX_UPLOADS / 2 } else { 1 };

/// An upload in progress, counted (over all callers, and for its caller) until dropped.
struct Uploading {
    all: Arc<std::sync::atomic::AtomicUsize>,
    by_caller: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl Drop for Uploading {
    fn drop(&mut self) {
        self.all.fetch_sub(1, Ordering::Relaxed);
        let mut by_caller = self.by_caller.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_caller.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_caller.remove(&self.caller);
            }
        }
    }
}

#[derive(Debug)]
struct Run {
    id: String,
    model: String,
    /// The version asked for (`NAME@VERSION`), else the one the run evaluated once it is
    /// done (it stayed null: a review's finding).
    version: std::sync::OnceLock<u64>,
    created: String,
    /// Who started it: only they (or an admin) see, cancel and read it.
    owner: String,
    progress: Arc<RunProgress>,
    state: Mutex<RunState>,
    /// Its thread has finished (a cancelled or stopped run's may still be finishing a
    /// bootstrap; what it finds is thrown away, no report is kept).
    ended: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum RunState {
    Running,
    Done {
        gate_passed: Option<bool>,
    },
    Failed {
        error: String,
    },
    /// Cancelled by a caller: the model may run another validation at once, whatever the
    /// worker is still doing (it stops at its next row; what it finds is discarded).
    Cancelled {
        by: String,
    },
    /// Ran past the server's deadline for a run (`--validation-max-run-secs`): stopped as a
    /// cancelled run is.
    TimedOut {
        after: std::time::Duration,
    },
}

/// A run's record in its folder ([`RUN_FILE`]): what is said of it, kept across restarts.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRecord {
    id: String,
    model: String,
    version: Option<u64>,
    created: String,
    owner: String,
    state: RunState,
    rows: u64,
    bytes_read: u64,
    total_bytes: u64,
}

/// A run's version as known: `Some` set, `None` to be set once the run is done.
fn version_lock(version: Option<u64>) -> std::sync::OnceLock<u64> {
    let lock = std::sync::OnceLock::new();
    if let Some(v) = version {
        let _ = lock.set(v);
    }
    lock
}

/// A run's record's name in its folder.
const RUN_FILE: &str = "run.json";

/// A record is a few hundred bytes (an error message at most a few KiB): one larger than
/// this is not read.
const MAX_RUN_FILE: u64 = 64 << 10;

impl Run {
    /// Writes the run's record with `state` (the run's state, its lock held by the caller so
    /// records are written in the order of the states) into `runs_dir/{id}/run.json`,
    /// replacing the one there whole. A record that cannot be written is logged: the run
    /// goes on, and is not listed after a restart.
    fn save(&self, runs_dir: &FsPath, state: &RunState) {
        let p = &self.progress;
        let record = RunRecord {
            id: self.id.clone(),
            model: self.model.clone(),
            version: self.version.get().copied(),
            created: self.created.clone(),
            owner: self.owner.clone(),
            state: state.clone(),
            rows: p.rows.load(Ordering::Relaxed),
            bytes_read: p.bytes_read.load(Ordering::Relaxed),
            total_bytes: p.total_bytes.load(Ordering::Relaxed),
        };
        let dir = runs_dir.join(&self.id);
        let written = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_private(&dir, RUN_FILE, &bytes));
        if let Err(e) = written {
            tracing::warn!(run = %self.id, error = %e,
                "the validation run's record could not be written: it will not be listed after a restart");
        }
    }
}

/// Writes `name` in `dir` whole (a temporary file renamed over it), readable by its owner
/// only, never through a link.
fn write_private(dir: &FsPath, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = tempfile::Builder::new()
        .prefix(".run.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(dir.join(name)).map_err(|e| e.error)?;
    Ok(())
}

/// Reads a run's record from its folder: a regular file (not a link) of at most
/// [`MAX_RUN_FILE`] bytes, naming the folder's own id.
fn read_record(dir: &FsPath, id: &str) -> Option<RunRecord> {
    let path = dir.join(RUN_FILE);
    if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let bytes = crate::files::read_regular(&path, MAX_RUN_FILE).ok()?;
    let record: RunRecord = serde_json::from_slice(&bytes).ok()?;
    (record.id == id).then_some(record)
}

impl Validation {
    pub fn new(
        root: Option<PathBuf>,
        data_dir: &FsPath,
        max_upload_bytes: u64,
        options: nightingale_models::RepositoryOptions,
    ) -> Validation {
        Validation {
            root,
            runs_dir: data_dir.join("validation").join("runs"),
            max_upload_bytes,
            options,
            max_run: DEFAULT_MAX_RUN,
            runs: Mutex::new(HashMap::new()),
            order: Mutex::new(Vec::new()),
            working: Arc::default(),
            uploading: Arc::default(),
            uploaders: Arc::default(),
        }
    }

    /// Stops runs that take longer than `max_run` (see [`DEFAULT_MAX_RUN`]).
    pub fn with_max_run(mut self, max_run: std::time::Duration) -> Validation {
        self.max_run = max_run;
        self
    }

    fn get(&self, id: &str) -> Option<Arc<Run>> {
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// What [`Validation::start`] would refuse, asked before an upload is received: nothing
    /// is read (or written to disk) for a run that could not start.
    fn precheck(&self, model: &str) -> Result<(), AppError> {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        self.refusal(&runs, model)
    }

    /// Why a run of `model` cannot start now: [`MAX_WORKING_RUNS`] threads working (503), or
    /// a run of the model still running (409).
    fn refusal(&self, runs: &HashMap<String, Arc<Run>>, model: &str) -> Result<(), AppError> {
        if self.working.load(Ordering::Relaxed) >= MAX_WORKING_RUNS {
            return Err(AppError::overloaded(format!(
                "{MAX_WORKING_RUNS} validation runs are still working (a cancelled or stopped run ends at its next row or bootstrap replicate); retry later"
            )));
        }
        if let Some(busy) = runs.values().find(|r| {
            r.model == model
                && matches!(
                    *r.state.lock().unwrap_or_else(|p| p.into_inner()),
                    RunState::Running
                )
        }) {
            // Not its id: the run may be another researcher's (a red-team finding).
            return Err(AppError::new(
                StatusCode::CONFLICT,
                format!(
                    "a validation run of {} is still running (one run per model at a time; its owner, or a caller holding admin besides researcher, can cancel it)",
                    busy.model
                ),
            ));
        }
        Ok(())
    }

    /// A place among the uploads received at once ([`MAX_UPLOADS`], at most
    /// [`MAX_UPLOADS_PER_CALLER`] of them `caller`'s), or 503.
    fn uploading(&self, caller: &str) -> Result<Uploading, AppError> {
        {
            let mut by_caller = self.uploaders.lock().unwrap_or_else(|p| p.into_inner());
            let mine = by_caller.entry(caller.to_owned()).or_insert(0);
            if *mine >= MAX_UPLOADS_PER_CALLER {
                return Err(AppError::overloaded(format!(
                    "you have {MAX_UPLOADS_PER_CALLER} dataset uploads being received, the most one caller may; retry when one has ended"
                )));
            }
            *mine += 1;
        }
        let before = self.uploading.fetch_add(1, Ordering::Relaxed);
        let place = Uploading {
            all: self.uploading.clone(),
            by_caller: self.uploaders.clone(),
            caller: caller.to_owned(),
        };
        if before >= MAX_UPLOADS {
            return Err(AppError::overloaded(format!(
                "{MAX_UPLOADS} dataset uploads are being received; retry later"
            )));
        }
        Ok(place)
    }

    /// Stops every running run (the server is shutting down): each stops at its next row,
    /// as a cancelled one does, and keeps no report. Returns how many were running.
    pub fn stop_all(&self) -> usize {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let mut stopped = 0;
        for run in runs.values() {
            let mut st = run.state.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(*st, RunState::Running) {
                run.progress.cancelled.store(true, Ordering::Relaxed);
                *st = RunState::Cancelled {
                    by: "server shutdown".into(),
                };
                run.save(&self.runs_dir, &st);
                stopped += 1;
            }
        }
        stopped
    }

    /// Runs whose threads have not ended (cancelled and stopped ones included).
    pub fn working(&self) -> usize {
        self.working.load(Ordering::Relaxed)
    }

    /// Registers a run unless one for the same model is still running, or
    /// [`MAX_WORKING_RUNS`] threads are still working (503): the run's thread then counts
    /// until [`Validation::ended`].
    fn start(&self, run: Arc<Run>) -> Result<(), AppError> {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        self.refusal(&runs, &run.model)?;
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest run that has ended is forgotten first; a run still running never is (its
        // owner could no longer see or cancel it, and its model would take a second run). A
        // forgotten run that failed or was cancelled has its folder deleted (nothing in it
        // counts for anything); a done one's report stays on disk.
        let mut forgotten = vec![];
        let finished = |r: &Run| {
            r.ended.load(Ordering::Relaxed)
                && !matches!(
                    *r.state.lock().unwrap_or_else(|p| p.into_inner()),
                    RunState::Running
                )
        };
        loop {
            let owners = order
                .iter()
                .filter(|id| runs.get(*id).is_some_and(|r| r.owner == run.owner))
                .count();
            let over = if owners >= KEPT_RUNS {
                Some(true)
            } else if order.len() >= KEPT_RUNS_IN_ALL {
                Some(false)
            } else {
                None
            };
            let Some(own) = over else { break };
            let Some(at) = order.iter().position(|id| {
                runs.get(id)
                    .is_none_or(|r| (!own || r.owner == run.owner) && finished(r))
            }) else {
                break;
            };
            let old = order.remove(at);
            if let Some(old) = runs.remove(&old)
                && !matches!(
                    *old.state.lock().unwrap_or_else(|p| p.into_inner()),
                    RunState::Done { .. }
                )
            {
                forgotten.push(old.id.clone());
            }
        }
        order.push(run.id.clone());
        runs.insert(run.id.clone(), run);
        self.working.fetch_add(1, Ordering::Relaxed);
        drop(order);
        drop(runs);
        for id in forgotten {
            remove_forgotten_run(&self.runs_dir.join(id));
        }
        Ok(())
    }

    /// A started run's thread has ended.
    fn ended(working: &std::sync::atomic::AtomicUsize) {
        working.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The options of a run: the query string of an upload, or the JSON body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// NAME or NAME@VERSION.
    pub model: String,
    /// A CSV or a tensor folder under `--validation-root` (JSON requests only).
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub label_column: Option<String>,
    /// Comma-separated subgroup columns.
    #[serde(default)]
    pub subgroup: Option<String>,
    #[serde(default)]
    pub patient_id_column: Option<String>,
    #[serde(default)]
    pub bootstrap: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
}

fn model_name(m: &str) -> &str {
    m.split_once('@').map_or(m, |(n, _)| n)
}

/// A dataset under the validation root (see [`path_under`]).
fn under_root(root: &FsPath, rel: &str) -> Result<PathBuf, AppError> {
    path_under(root, rel).map_err(|e| match e {
        PathRefused::NotRelative => AppError::bad_request(
            "dataset must be a relative path under the server's validation root, without ..",
        ),
        PathRefused::RootMissing => {
            AppError::new(StatusCode::NOT_FOUND, "the validation root is missing")
        }
        PathRefused::Missing => AppError::not_found("no such dataset under the validation root"),
        PathRefused::Outside => AppError::bad_request("dataset leads outside the validation root"),
    })
}

/// The `charset` parameter of the request's Content-Type, lower-cased, its quotes removed;
/// `Some("")` (no charset any reader takes) when it is given twice or a parameter is quoted
/// in a way this reading cannot follow (a quote holding `;`): the first of several was
/// taken, so `charset=utf-8; charset=latin1` passed (a re-attack's finding).
fn declared_charset(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mut found = None;
    for parameter in value.split(';').skip(1) {
        let Some((name, v)) = parameter.split_once('=') else {
            if parameter.contains('"') {
                return Some(String::new());
            }
            continue;
        };
        let v = v.trim();
        let unquoted = match v.strip_prefix('"') {
            Some(rest) => match rest.strip_suffix('"') {
                Some(inner) if !inner.contains('"') => inner,
                _ => return Some(String::new()),
            },
            None if v.contains('"') => return Some(String::new()),
            None => v,
        };
        if name.trim().eq_ignore_ascii_case("charset") {
            if found.is_some() {
                return Some(String::new());
            }
            found = Some(unquoted.to_ascii_lowercase());
        }
    }
    found
}

/// `POST /validation/runs`.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // An option given twice is refused, as a JSON body's duplicate field is (the last one
    // was taken: `bootstrap=1&bootstrap=2` ran 2, a review's finding).
    let mut query = HashMap::new();
    for (key, value) in pairs {
        if query.contains_key(&key) {
            let shown: String = key.chars().take(64).collect();
            return AppError::bad_request(format!("query parameter {shown:?} is given twice"))
                .into_response();
        }
        query.insert(key, value);
    }
    match create_run(&state, caller, query, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn create_run(
    state: &Arc<AppState>,
    caller: Option<Extension<Caller>>,
    query: HashMap<String, String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let Some(validation) = state.validation() else {
        return Err(AppError::not_found(
            "validation runs are off on this server",
        ));
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    // A misspelt option (?boostrap=0) would otherwise be a run with the default silently.
    const OPTIONS: [&str; 7] = [
        "model",
        "output",
        "label_column",
        "subgroup",
        "patient_id_column",
        "bootstrap",
        "seed",
    ];
    if let Some(key) = query.keys().find(|k| !OPTIONS.contains(&k.as_str())) {
        return Err(AppError::bad_request(format!(
            "unknown query parameter {:?}: an upload's options are {}",
            key.chars().take(64).collect::<String>(),
            OPTIONS.join(", ")
        )));
    }
    if content_type == "application/json" && !query.is_empty() {
        return Err(AppError::bad_request(
            "a JSON request carries its options in its body, not in the query string",
        ));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let dir = validation.runs_dir.join(&id);
    // An upload's folder goes whatever ends the request before its run starts: a refusal,
    // a body cut off, the client gone (the handler dropped), the request deadline.
    let mut upload = RemoveOnDrop(None);
    // Held while the upload and its run live (see `hold_run_folder`).
    let mut owner_lock: Option<std::fs::File> = None;
    let (request, dataset, uploaded) = match content_type.as_str() {
        "application/json" => {
            let bytes = axum::body::to_bytes(body, 64 << 10).await.map_err(|_| {
                AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the JSON body is at most 64 KiB",
                )
            })?;
            let request: RunRequest = serde_json::from_slice(&bytes)
                .map_err(|e| AppError::bad_request(format!("the request is not valid: {e}")))?;
            let Some(root) = &validation.root else {
                return Err(AppError::bad_request(
                    "this server names no --validation-root: upload the dataset as text/csv",
                ));
            };
            let rel = request.dataset.as_deref().ok_or_else(|| {
                AppError::bad_request("dataset (a path under the validation root) is required")
            })?;
            let path = under_root(root, rel)?;
            (request, path, false)
        }
        "text/csv" => {
            // The CSV reader takes UTF-8 only: an upload declared in another character set
            // is refused here, not accepted and then failed (a review's finding: a Latin-1
            // export was taken with 202, and its run failed on the first accented note).
            if let Some(charset) = declared_charset(headers)
                && !matches!(charset.as_str(), "utf-8" | "utf8" | "us-ascii")
            {
                return Err(AppError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "an uploaded CSV must be UTF-8 (Content-Type: text/csv; charset=utf-8): convert it first, e.g. iconv -f latin1 -t utf-8",
                ));
            }
            let request = RunRequest {
                model: query.get("model").cloned().unwrap_or_default(),
                dataset: None,
                output: query.get("output").cloned(),
                label_column: query.get("label_column").cloned(),
                subgroup: query.get("subgroup").cloned(),
                patient_id_column: query.get("patient_id_column").cloned(),
                bootstrap: parse_query(&query, "bootstrap")?,
                seed: parse_query(&query, "seed")?,
            };
            if let Some(len) = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                && len > validation.max_upload_bytes
            {
                return Err(AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the dataset declares {len} bytes; uploads are at most {}",
                        validation.max_upload_bytes
                    ),
                ));
            }
            if request.model.is_empty() {
                return Err(AppError::bad_request("?model=NAME[@VERSION] is required"));
            }
            // The upload is stored and read as sent: a compressed one was taken for the CSV
            // (a run on gzip bytes), one in another coding ran on its raw bytes.
            if let Some(coding) = headers
                .get(header::CONTENT_ENCODING)
                .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
                .filter(|c| c != "identity")
            {
                return Err(AppError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!(
                        "uploads are read as sent: send the CSV without Content-Encoding (it has {:?})",
                        coding.chars().take(32).collect::<String>()
                    ),
                ));
            }
            // What would refuse the run is asked before the body is read.
            let name = model_name(&request.model);
            if state.repository.index().iter().all(|e| e.name != name) {
                return Err(AppError::not_found(format!("unknown model {name:?}")));
            }
            validation.precheck(name)?;
            let uploader = caller
                .as_ref()
                .map_or_else(|| Caller::ANONYMOUS.to_owned(), |c| c.0.id.clone());
            let _place = validation.uploading(&uploader)?;
            let path = dir.join(UPLOAD_FILE);
            upload.0 = Some(dir.clone());
            owner_lock = Some(hold_run_folder(&dir).map_err(folder_error)?);
            receive(body, &dir, &path, validation.max_upload_bytes).await?;
            (request, path, true)
        }
        _ => {
            return Err(AppError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send application/json naming a dataset under the validation root, or the dataset as text/csv",
            ));
        }
    };
    let name = model_name(&request.model).to_owned();
    if state.repository.index().iter().all(|e| e.name != name) {
        return Err(AppError::not_found(format!("unknown model {name:?}")));
    }
    if owner_lock.is_none() {
        // A run on a dataset under the root: its folder (its record, its report) is made and
        // held now, and goes if the run does not start.
        upload.0 = Some(dir.clone());
        owner_lock = Some(hold_run_folder(&dir).map_err(folder_error)?);
    }
    let mut argv: Vec<String> = vec![
        "validate".into(),
        "--repository".into(),
        state.repository.root().display().to_string(),
        "--model".into(),
        request.model.clone(),
        "--dataset".into(),
        dataset.display().to_string(),
        "--out".into(),
        dir.display().to_string(),
        "--quiet".into(),
    ];
    for (flag, value) in [
        ("--output", request.output.clone()),
        ("--label-column", request.label_column.clone()),
        ("--subgroup", request.subgroup.clone()),
        ("--patient-id-column", request.patient_id_column.clone()),
        ("--bootstrap", request.bootstrap.map(|v| v.to_string())),
        ("--seed", request.seed.map(|v| v.to_string())),
    ] {
        if let Some(v) = value {
            argv.push(flag.into());
            argv.push(v);
        }
    }
    // What the job would refuse at its start is refused here, before the 202: the options'
    // ranges, NAME@VERSION's form, and a version that is not in the bundle.
    let refuse = |message: String| Err(AppError::bad_request(message));
    let command = match ValidateCommand::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            let text = e.to_string();
            return refuse(text.lines().next().unwrap_or("invalid options").to_owned());
        }
    };
    if let Err(e) = crate::validate::settings(&command.args) {
        return refuse(e.to_string());
    }
    match crate::validate::parse_model(&request.model) {
        Err(e) => return refuse(e.to_string()),
        Ok((_, Some(v)))
            if !state
                .repository
                .root()
                .join(&name)
                .join(v.to_string())
                .is_dir() =>
        {
            return refuse(format!("model {name:?} has no version {v}"));
        }
        Ok(_) => {}
    }
    let owner = caller
        .as_ref()
        .map_or_else(|| Caller::ANONYMOUS.to_owned(), |c| c.0.id.clone());
    let run = Arc::new(Run {
        id: id.clone(),
        model: name,
        version: version_lock(
            request
                .model
                .split_once('@')
                .and_then(|(_, v)| v.parse().ok()),
        ),
        // To the millisecond: runs are listed again in this order after a restart.
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        owner: owner.clone(),
        progress: Arc::new(RunProgress::default()),
        state: Mutex::new(RunState::Running),
        ended: std::sync::atomic::AtomicBool::new(false),
    });
    run.save(&validation.runs_dir, &RunState::Running);
    validation.start(run.clone())?;
    let dataset_name = if uploaded {
        "the uploaded dataset".to_owned()
    } else {
        request.dataset.clone().unwrap_or_default()
    };
    let ctx = RunContext {
        dataset_label: Some(dataset_name.clone()),
        uploaded,
        researcher: !caller
            .as_ref()
            .is_some_and(|c| c.0.has(super::auth::Role::Admin)),
        options: Some(validation.options.clone()),
        audit: Some(state.audit.clone()),
        progress: Some(run.progress.clone()),
        actor: Some(owner),
        run_id: Some(id.clone()),
        confined: !uploaded,
    };
    let worker = run.clone();
    let working = validation.working.clone();
    let run_dir = dir.clone();
    let repository_root = state.repository.root().to_path_buf();
    tracing::info!(run = %id, model = %run.model, uploaded, "validation run started");
    // The deadline: a run still going then stops at its next row, as a cancelled one does,
    // and the model is free for another run at once. Ended with the run.
    let max_run = validation.max_run;
    let watched = run.clone();
    let runs_dir = validation.runs_dir.clone();
    let deadline = tokio::spawn(async move {
        tokio::time::sleep(max_run).await;
        let mut st = watched.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*st, RunState::Running) {
            watched.progress.cancelled.store(true, Ordering::Relaxed);
            *st = RunState::TimedOut { after: max_run };
            watched.save(&runs_dir, &st);
            tracing::warn!(run = %watched.id, model = %watched.model, limit_s = max_run.as_secs(),
                "validation run stopped: it ran past the server's limit");
        }
    });
    let deadline = deadline.abort_handle();
    // The run owns its folder now (it deletes the upload itself, keeps the report).
    upload.0 = None;
    let runs_dir = validation.runs_dir.clone();
    tokio::task::spawn_blocking(move || {
        let outcome = crate::validate::run_job(&command.args, ctx);
        if uploaded {
            // the upload may hold patient data: only the report is kept
            let _ = std::fs::remove_file(&dataset);
        }
        let next = match outcome {
            Ok(report) => {
                if let Some(model) = &report.model {
                    let _ = worker.version.set(model.version);
                }
                RunState::Done {
                    gate_passed: report.gate.as_ref().map(|g| g.passed),
                }
            }
            Err(e) => RunState::Failed {
                // Server paths are not the caller's business: the dataset by the name it
                // was given, the rest relative to the repository or the run.
                error: format!("{e:#}")
                    .replace(&dataset.display().to_string(), &dataset_name)
                    .replace(&format!("{}/", run_dir.display()), "")
                    .replace(&format!("{}/", repository_root.display()), ""),
            },
        };
        tracing::info!(run = %worker.id, state = ?next, "validation run ended");
        let mut state = worker.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*state, RunState::Running) {
            *state = next;
        } else {
            // Cancelled or stopped while it finished: no report of it may stay (a server
            // started with --require-validation would take a passing one as the version's).
            remove_report(&run_dir);
        }
        worker.save(&runs_dir, &state);
        // Held until the record says how the run ended: another server on the data folder
        // takes a record saying "running" in a folder no one holds for an interrupted run.
        drop(owner_lock);
        worker.ended.store(true, Ordering::Relaxed);
        drop(state);
        Validation::ended(&working);
        deadline.abort();
    });
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/validation/runs/{id}"))],
        Json(describe(&run)),
    )
        .into_response())
}

fn parse_query<T: std::str::FromStr>(
    query: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, AppError> {
    query
        .get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| AppError::bad_request(format!("?{key} is not a number")))
        })
        .transpose()
}

/// The uploaded dataset's name in its run's folder.
const UPLOAD_FILE: &str = "dataset.csv";

/// The lock file in a run's folder, held (an exclusive `flock`) by the process whose upload
/// or run it is, for as long as they live.
const OWNER_LOCK: &str = ".owner.lock";

/// Creates a run's folder and takes its [`OWNER_LOCK`]: while it is held no other server on
/// the data folder takes the upload in it for an abandoned one.
fn hold_run_folder(dir: &FsPath) -> std::io::Result<std::fs::File> {
    // For the server's user only: an upload may hold patient data (it was 0644 in a 0755
    // folder, readable by every local user while the run went: a red-team finding).
    crate::audit::jsonl::private_dir(dir)?;
    let file = owner_lock_file(dir, true)?;
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::Error(e) => e,
        std::fs::TryLockError::WouldBlock => {
            std::io::Error::other("the run's folder is held by another process")
        }
    })?;
    Ok(file)
}

/// A run's folder could not be made or held: 500.
fn folder_error(e: std::io::Error) -> AppError {
    AppError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot make the run's folder: {e}"),
    )
}

/// A run folder's [`OWNER_LOCK`], opened to write (`create`: made if missing, readable by
/// its owner only), never through a link.
fn owner_lock_file(dir: &FsPath, create: bool) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(create).truncate(false).write(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    // Not blocking: a FIFO in its place held the open (and the server's start) for ever.
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        &mut options,
        libc::O_NOFOLLOW | libc::O_NONBLOCK,
    );
    let file = options.open(dir.join(OWNER_LOCK))?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the run's lock is not a regular file",
        ));
    }
    Ok(file)
}

impl Validation {
    /// Deletes the uploads that no process holds any more: a server killed (`kill -9`, a
    /// power cut) while it received an upload or ran it left the dataset, which may hold
    /// patient data, on disk for good, and no run survives a restart to delete it (a
    /// red-team finding). Only an upload's file is deleted (a link as the link), and its
    /// folder only when nothing else is left in it: other runs' folders (a dataset named
    /// under the validation root, a `validate --out` run with its audit trail, an operator's
    /// own files) are not this clean-up's (a re-attack's finding: they were deleted whole).
    /// Folders another server on the same data folder holds are left alone. Returns how many
    /// uploads were deleted.
    pub fn remove_abandoned_uploads(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.runs_dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let dir = entry.path();
            // A run of this server's making: named by its UUID, holding the owner lock it
            // made before the upload (a re-attack's finding: a `validate --out` folder's
            // `dataset.csv` was deleted, and a lock file created through a link).
            let is_run = entry
                .file_name()
                .to_str()
                .is_some_and(|n| uuid::Uuid::parse_str(n).is_ok());
            if !is_run || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let lock_path = dir.join(OWNER_LOCK);
            if !std::fs::symlink_metadata(&lock_path).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let Ok(lock) = owner_lock_file(&dir, false) else {
                continue;
            };
            if lock.try_lock().is_err() {
                continue;
            }
            let upload = dir.join(UPLOAD_FILE);
            if std::fs::symlink_metadata(&upload).is_ok_and(|m| !m.is_dir())
                && std::fs::remove_file(&upload).is_ok()
            {
                removed += 1;
            }
            // The folder of an upload cut off before its run wrote anything: only the lock.
            let only_the_lock = std::fs::read_dir(&dir).is_ok_and(|entries| {
                entries
                    .flatten()
                    .all(|e| e.file_name() == std::ffi::OsStr::new(OWNER_LOCK))
            });
            if only_the_lock {
                let _ = std::fs::remove_file(dir.join(OWNER_LOCK));
                let _ = std::fs::remove_dir(&dir);
            }
        }
        if removed > 0 {
            tracing::warn!(
                removed,
                "validation uploads left by a server that stopped while it held them were deleted"
            );
        }
        removed
    }
}

/// Deletes a run's report (a cancelled or stopped run keeps none: a server started with
/// `--require-validation` would take a passing one as the version's), and the temporary
/// files a report is written through (a stop between writing and renaming one left a whole
/// report.html behind).
fn remove_report(dir: &FsPath) {
    for file in ["report.json", "report.html"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".report.") && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Deletes the folder of a run this server forgot that failed or was cancelled, when it holds
/// only what a run of this server's making leaves there ([`RUN_FILE`], [`OWNER_LOCK`],
/// [`UPLOAD_FILE`], temporary records and reports) and no process holds it: a folder holding
/// anything else is an operator's, and left alone. Returns whether it was deleted.
fn remove_forgotten_run(dir: &FsPath) -> bool {
    let Ok(lock) = owner_lock_file(dir, false) else {
        return false;
    };
    if lock.try_lock().is_err() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut files = vec![];
    for entry in entries {
        let Ok(entry) = entry else { return false };
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return false;
        };
        let ours = [RUN_FILE, OWNER_LOCK, UPLOAD_FILE].contains(&name)
            || ((name.starts_with(".run.") || name.starts_with(".report."))
                && name.ends_with(".tmp"));
        if !ours || entry.file_type().is_ok_and(|t| t.is_dir()) {
            return false;
        }
        files.push(entry.path());
    }
    // The lock goes last: while anything is left, another server sees the folder held.
    files.sort_by_key(|f| f.ends_with(OWNER_LOCK));
    for file in files {
        if std::fs::remove_file(&file).is_err() {
            return false;
        }
    }
    drop(lock);
    std::fs::remove_dir(dir).is_ok()
}

/// The gate outcome of a run's whole report and page (`Some(None)`: no gate), or `None`
/// when the run has not both.
fn finished_report(dir: &FsPath) -> Option<Option<bool>> {
    if !std::fs::symlink_metadata(dir.join("report.html")).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let path = dir.join("report.json");
    if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let bytes = crate::files::read_regular(&path, crate::validate::MAX_REPORT_BYTES).ok()?;
    let report: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(report["gate"]["passed"].as_bool())
}

impl Validation {
    /// Lists again the runs whose records are in the runs folder (the newest [`KEPT_RUNS`] of
    /// each owner), as they were when the server stopped: a run it stopped in the middle
    /// (killed, or the power cut) is failed, and keeps no report, unless its whole report was
    /// written (it is then done). A run another server on the same data
    /// folder is running (it holds the run's folder) is left to that server. Returns how many
    /// runs were listed again.
    pub fn restore_runs(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.runs_dir) else {
            return 0;
        };
        let mut restored = vec![];
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !valid_id(&id) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let dir = entry.path();
            let Some(mut record) = read_record(&dir, &id) else {
                continue;
            };
            let progress = RunProgress::default();
            progress.rows.store(record.rows, Ordering::Relaxed);
            progress
                .bytes_read
                .store(record.bytes_read, Ordering::Relaxed);
            progress
                .total_bytes
                .store(record.total_bytes, Ordering::Relaxed);
            let interrupted = matches!(record.state, RunState::Running);
            if interrupted {
                // Held: another server's run, still going.
                let held = match owner_lock_file(&dir, false) {
                    Ok(lock) => lock.try_lock().is_err(),
                    Err(e) => e.kind() != std::io::ErrorKind::NotFound,
                };
                if held {
                    continue;
                }
                // Its report was written whole (renamed into place) before the server
                // stopped: the run ended, only its record was not told (another server may
                // already have counted that report for --require-validation).
                record.state = match finished_report(&dir) {
                    Some(gate_passed) => RunState::Done { gate_passed },
                    None => RunState::Failed {
                        error: "the server stopped before the run ended".into(),
                    },
                };
            }
            if !matches!(record.state, RunState::Done { .. }) {
                remove_report(&dir);
            }
            let run = Run {
                id,
                model: record.model,
                version: version_lock(record.version),
                created: record.created,
                owner: record.owner,
                progress: Arc::new(progress),
                state: Mutex::new(record.state.clone()),
                ended: std::sync::atomic::AtomicBool::new(true),
            };
            if interrupted {
                run.save(&self.runs_dir, &record.state);
            }
            restored.push(Arc::new(run));
        }
        // Newest first, as they were started (RFC 3339 UTC to the millisecond sorts as text):
        // the newest KEPT_RUNS of each owner, KEPT_RUNS_IN_ALL in all, are kept.
        restored.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        let mut per_owner: HashMap<String, usize> = HashMap::new();
        let mut kept = 0;
        let (mut restored, dropped): (Vec<_>, Vec<_>) = restored.into_iter().partition(|r| {
            let n = per_owner.entry(r.owner.clone()).or_default();
            *n += 1;
            let keep = *n <= KEPT_RUNS && kept < KEPT_RUNS_IN_ALL;
            kept += usize::from(keep);
            keep
        });
        restored.reverse();
        // Failed and cancelled runs not listed again are deleted (50,000 failed runs' folders
        // took 16 s to list at every start, a red-team finding); done ones keep their reports.
        let deleted = dropped
            .iter()
            .filter(|r| {
                !matches!(
                    *r.state.lock().unwrap_or_else(|p| p.into_inner()),
                    RunState::Done { .. }
                )
            })
            .filter(|r| remove_forgotten_run(&self.runs_dir.join(&r.id)))
            .count();
        if deleted > 0 {
            tracing::info!(
                runs = deleted,
                "folders of older failed or cancelled validation runs were deleted"
            );
        }
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let mut listed = 0;
        for run in restored {
            if runs.contains_key(&run.id) {
                continue;
            }
            order.push(run.id.clone());
            runs.insert(run.id.clone(), run);
            listed += 1;
        }
        if listed > 0 {
            tracing::info!(
                runs = listed,
                "validation runs listed again from their records"
            );
        }
        listed
    }
}

/// `GET /validation/runs`: the caller's runs (an admin's: everyone's), newest first.
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
) -> Response {
    let Some(validation) = state.validation() else {
        return AppError::not_found("validation runs are off on this server").into_response();
    };
    let (who, admin) = caller.as_ref().map_or((Caller::ANONYMOUS, false), |c| {
        (c.0.id.as_str(), c.0.has(super::auth::Role::Admin))
    });
    let mine: Vec<Arc<Run>> = {
        let runs = validation.runs.lock().unwrap_or_else(|p| p.into_inner());
        let order = validation.order.lock().unwrap_or_else(|p| p.into_inner());
        order
            .iter()
            .rev()
            .filter_map(|id| runs.get(id))
            .filter(|r| admin || r.owner == who)
            .cloned()
            .collect()
    };
    let runs: Vec<serde_json::Value> = mine.iter().map(|r| describe(r)).collect();
    Json(json!({ "runs": runs })).into_response()
}

/// Removes a folder when dropped (an upload whose run never started), unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Streams the body to `path` (created in `dir`), at most `limit` bytes.
async fn receive(body: Body, dir: &FsPath, path: &FsPath, limit: u64) -> Result<(), AppError> {
    let io = |e: std::io::Error| {
        AppError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store the upload: {e}"),
        )
    };
    crate::audit::jsonl::private_dir(dir).map_err(io)?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(io)?;
    let mut body = body;
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| AppError::bad_request(format!("the upload was cut: {e}")))?;
        if let Ok(data) = frame.into_data() {
            written += data.len() as u64;
            if written > limit {
                return Err(AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("uploads are at most {limit} bytes"),
                ));
            }
            file.write_all(&data).await.map_err(io)?;
        }
    }
    file.flush().await.map_err(io)?;
    if written == 0 {
        return Err(AppError::bad_request("the upload is empty"));
    }
    Ok(())
}

fn describe(run: &Run) -> serde_json::Value {
    let state = run.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let base = format!("/validation/runs/{}", run.id);
    let (status, gate, error) = match state {
        RunState::Running => ("running", None, None),
        RunState::Done { gate_passed } => ("done", gate_passed, None),
        RunState::Failed { error } => ("failed", None, Some(error)),
        RunState::Cancelled { by } => ("cancelled", None, Some(format!("cancelled by {by}"))),
        RunState::TimedOut { after } => (
            "failed",
            None,
            Some(format!(
                "stopped after {} s, the server's limit on a validation run (--validation-max-run-secs)",
                after.as_secs()
            )),
        ),
    };
    let p = &run.progress;
    json!({
        "id": run.id,
        "model": run.model,
        "version": run.version.get(),
        "created": run.created,
        "status": status,
        "progress": {
            "rows": p.rows.load(Ordering::Relaxed),
            "bytes_read": p.bytes_read.load(Ordering::Relaxed),
            "total_bytes": p.total_bytes.load(Ordering::Relaxed),
        },
        "gate_passed": gate,
        "error": error,
        "ended": run.ended.load(Ordering::Relaxed),
        "report": (status == "done").then(|| json!({
            "json": format!("{base}/report.json"),
            "html": format!("{base}/report.html"),
        })),
    })
}

fn valid_id(id: &str) -> bool {
    id.len() == 36 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// The validation service and the run `id` names (404 when runs are off or there is none,
/// or when it is another caller's: a run, its progress and its report are its owner's and
/// the admins', as uploads may hold patient data; another researcher is not told it exists).
fn find_run<'a>(
    state: &'a AppState,
    caller: &Option<Extension<Caller>>,
    id: &str,
) -> Result<(&'a Validation, Arc<Run>), AppError> {
    let validation = state
        .validation()
        .ok_or_else(|| AppError::not_found("validation runs are off on this server"))?;
    let (who, admin) = caller.as_ref().map_or((Caller::ANONYMOUS, false), |c| {
        (c.0.id.as_str(), c.0.has(super::auth::Role::Admin))
    });
    let run = valid_id(id)
        .then(|| validation.get(id))
        .flatten()
        .filter(|r| admin || r.owner == who)
        .ok_or_else(|| AppError::not_found("no such validation run"))?;
    Ok((validation, run))
}

/// `GET /validation/runs/{id}`.
pub(crate) async fn status(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Response {
    match find_run(&state, &caller, &id) {
        Ok((_, run)) => Json(describe(&run)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /validation/runs/{id}`: cancels a running run (200 with its description; 409
/// when it has already ended). The model is free for another run at once; the run stops at
/// its next row (a bootstrap already under way finishes first, its result thrown away).
pub(crate) async fn cancel(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Response {
    let run = match find_run(&state, &caller, &id) {
        Ok((_, run)) => run,
        Err(e) => return e.into_response(),
    };
    let by = caller
        .as_ref()
        .map_or_else(|| Caller::ANONYMOUS.to_owned(), |c| c.0.id.clone());
    {
        let mut st = run.state.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*st, RunState::Running) {
            return AppError::new(StatusCode::CONFLICT, "the run has already ended")
                .into_response();
        }
        run.progress.cancelled.store(true, Ordering::Relaxed);
        *st = RunState::Cancelled { by: by.clone() };
        if let Some(validation) = state.validation() {
            run.save(&validation.runs_dir, &st);
        }
    }
    tracing::info!(run = %run.id, model = %run.model, by = %by, "validation run cancelled");
    Json(describe(&run)).into_response()
}

async fn report_file(
    state: &AppState,
    caller: &Option<Extension<Caller>>,
    id: &str,
    file: &str,
    mime: &'static str,
) -> Response {
    let (validation, run) = match find_run(state, caller, id) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    if !matches!(
        *run.state.lock().unwrap_or_else(|p| p.into_inner()),
        RunState::Done { .. }
    ) {
        return AppError::new(StatusCode::CONFLICT, "the run has no report (yet)").into_response();
    }
    match tokio::fs::read(validation.runs_dir.join(id).join(file)).await {
        // The page is self-contained (inline styles and SVG, no script): a policy that runs
        // no script and loads nothing keeps whatever a dataset's text might smuggle into it
        // inert even if escaping ever failed (a review's hardening note).
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, mime),
                (header::CONTENT_SECURITY_POLICY, REPORT_POLICY),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes,
        )
            .into_response(),
        Err(_) => AppError::not_found("the report is gone").into_response(),
    }
}

/// The Content-Security-Policy of a report: nothing fetched, no script, no form, no frame;
/// inline styles and `data:` images only.
const REPORT_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'; sandbox";

/// `GET /validation/runs/{id}/report.json`.
pub(crate) async fn report_json(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Response {
    report_file(&state, &caller, &id, "report.json", "application/json").await
}

/// `GET /validation/runs/{id}/report.html`.
pub(crate) async fn report_html(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    Path(id): Path<String>,
) -> Response {
    report_file(
        &state,
        &caller,
        &id,
        "report.html",
        "text/html; charset=utf-8",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A review's finding: one researcher trickling four uploads held every upload place,
    /// and everyone else's upload was refused 503 until the request deadline, over and over.
    /// One caller holds at most half of the places; another still gets one; a place given
    /// back is the caller's again.
    #[test]
    fn one_caller_cannot_hold_every_upload_place() {
        let dir = tempfile::tempdir().unwrap();
        let v = Validation::new(None, dir.path(), 1 << 20, Default::default());
        let mine: Vec<Uploading> = (0..MAX_UPLOADS_PER_CALLER)
            .map(|_| v.uploading("api-key:r1").unwrap())
            .collect();
        let refused = v.uploading("api-key:r1").err().unwrap();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            refused.message.contains("the most one caller may"),
            "{}",
            refused.message
        );
        let other = v.uploading("api-key:r2").unwrap();
        drop(mine);
        let again = v.uploading("api-key:r1").unwrap();
        drop((other, again));
        assert!(v.uploaders.lock().unwrap().is_empty());
        assert_eq!(v.uploading.load(Ordering::Relaxed), 0);
    }

    fn run(model: &str) -> Arc<Run> {
        Arc::new(Run {
            id: uuid::Uuid::new_v4().to_string(),
            model: model.into(),
            version: std::sync::OnceLock::new(),
            created: String::new(),
            owner: Caller::ANONYMOUS.into(),
            progress: Arc::default(),
            state: Mutex::new(RunState::Running),
            ended: Default::default(),
        })
    }

    /// A record left saying "running" by a server that stopped (nothing holds its folder)
    /// is listed again as failed, and its report (written just before the stop) deleted; a
    /// cancelled run's report left behind is deleted too; a done run keeps its report; a
    /// record that is not a record (unparsable, another run's id, a link) is not listed.
    #[test]
    fn records_are_listed_again_as_they_ended() {
        let dir = tempfile::tempdir().unwrap();
        let v = Validation::new(None, dir.path(), 1 << 20, Default::default());
        let saved = |state: RunState| {
            let r = run("m");
            let folder = v.runs_dir.join(&r.id);
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("report.json"), "{}").unwrap();
            r.progress.rows.store(7, Ordering::Relaxed);
            r.save(&v.runs_dir, &state);
            (r.id.clone(), folder)
        };
        let (interrupted, interrupted_dir) = saved(RunState::Running);
        std::fs::write(interrupted_dir.join(".report.AbC123.tmp"), "<html>").unwrap();
        // Stopped after its report and page were written whole: done, as they say.
        let (reported, reported_dir) = saved(RunState::Running);
        std::fs::write(
            reported_dir.join("report.json"),
            r#"{"gate": {"passed": false}}"#,
        )
        .unwrap();
        std::fs::write(reported_dir.join("report.html"), "<html>").unwrap();
        // A FIFO as its lock: skipped, not waited for (the open blocked the start).
        let (fifo, fifo_dir) = saved(RunState::Running);
        let made = std::process::Command::new("mkfifo")
            .arg(fifo_dir.join(OWNER_LOCK))
            .status()
            .unwrap();
        assert!(made.success());
        let (cancelled, cancelled_dir) = saved(RunState::Cancelled { by: "x".into() });
        let (done, done_dir) = saved(RunState::Done {
            gate_passed: Some(true),
        });
        // Held by a live server: not listed, not touched.
        let (held, held_dir) = saved(RunState::Running);
        let _lock = hold_run_folder(&held_dir).unwrap();
        // Not records.
        let (_, garbled) = saved(RunState::Running);
        std::fs::write(garbled.join(RUN_FILE), "{not json").unwrap();
        let (_, moved) = saved(RunState::Running);
        std::fs::copy(done_dir.join(RUN_FILE), moved.join(RUN_FILE)).unwrap();
        let (_, linked) = saved(RunState::Running);
        std::fs::remove_file(linked.join(RUN_FILE)).unwrap();
        std::os::unix::fs::symlink(done_dir.join(RUN_FILE), linked.join(RUN_FILE)).unwrap();

        assert_eq!(v.restore_runs(), 4);
        assert!(v.get(&fifo).is_none());
        assert!(!interrupted_dir.join(".report.AbC123.tmp").exists());
        assert!(matches!(
            *v.get(&reported).unwrap().state.lock().unwrap(),
            RunState::Done {
                gate_passed: Some(false)
            }
        ));
        assert!(reported_dir.join("report.json").exists());
        let state = |id: &str| v.get(id).unwrap().state.lock().unwrap().clone();
        assert!(
            matches!(state(&interrupted), RunState::Failed { ref error } if error.contains("stopped before")),
            "{:?}",
            state(&interrupted)
        );
        assert!(!interrupted_dir.join("report.json").exists());
        assert!(matches!(state(&cancelled), RunState::Cancelled { .. }));
        assert!(!cancelled_dir.join("report.json").exists());
        assert!(matches!(
            state(&done),
            RunState::Done {
                gate_passed: Some(true)
            }
        ));
        assert!(done_dir.join("report.json").exists());
        assert_eq!(
            v.get(&done).unwrap().progress.rows.load(Ordering::Relaxed),
            7
        );
        assert!(v.get(&held).is_none());
        assert!(held_dir.join("report.json").exists());
        // The interrupted run's record now says so: a second start agrees.
        let again = Validation::new(None, dir.path(), 1 << 20, Default::default());
        drop(_lock);
        assert_eq!(
            again.restore_runs(),
            5,
            "the held run, its server gone, is listed too"
        );
        assert!(matches!(
            *again.get(&interrupted).unwrap().state.lock().unwrap(),
            RunState::Failed { .. }
        ));
    }

    /// Red-team finding: failed runs' folders were never deleted (50,000 of them took 16 s to
    /// list at every start). Those of failed and cancelled runs no longer listed are deleted,
    /// at start-up and when a newer run pushes them out; a done run's, a held one's and one
    /// holding files that are not a run's stay.
    #[test]
    fn forgotten_failed_runs_folders_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let v = Validation::new(None, dir.path(), 1 << 20, Default::default());
        let saved = |k: usize, state: RunState| {
            let r = run("m");
            let folder = v.runs_dir.join(&r.id);
            drop(hold_run_folder(&folder).unwrap());
            let r = Run {
                created: format!("2026-01-01T00:00:{:02}.{:03}Z", k / 1000, k % 1000),
                ..Arc::into_inner(r).unwrap()
            };
            r.save(&v.runs_dir, &state);
            folder
        };
        let failed = || RunState::Failed { error: "x".into() };
        // The five oldest: a failed one, a cancelled one with its upload, a done one, a
        // failed one holding an operator's file, a failed one another process holds.
        let old_failed = saved(0, failed());
        let old_cancelled = saved(1, RunState::Cancelled { by: "x".into() });
        std::fs::write(old_cancelled.join(UPLOAD_FILE), "a,b\n").unwrap();
        let old_done = saved(
            2,
            RunState::Done {
                gate_passed: Some(true),
            },
        );
        let with_notes = saved(3, failed());
        std::fs::write(with_notes.join("notes.txt"), "mine").unwrap();
        let held = saved(4, failed());
        let lock = owner_lock_file(&held, false).unwrap();
        lock.try_lock().unwrap();
        let newer: Vec<PathBuf> = (5..5 + KEPT_RUNS).map(|k| saved(k, failed())).collect();

        assert_eq!(v.restore_runs(), KEPT_RUNS);
        assert!(!old_failed.exists());
        assert!(!old_cancelled.exists());
        assert!(old_done.join(RUN_FILE).exists());
        assert!(with_notes.join("notes.txt").exists());
        assert!(held.join(RUN_FILE).exists());
        assert!(newer.iter().all(|f| f.join(RUN_FILE).exists()));

        // A new run pushes the oldest listed (failed) one out: its folder goes.
        let next = run("m");
        next.save(&v.runs_dir, &RunState::Running);
        v.start(next).unwrap();
        assert!(!newer[0].exists());
        assert!(newer[1].join(RUN_FILE).exists());
    }

    #[test]
    fn working_runs_are_bounded_cancelled_ones_included() {
        let dir = tempfile::tempdir().unwrap();
        let v = Validation::new(None, dir.path(), 1 << 20, Default::default());
        let runs: Vec<Arc<Run>> = (0..MAX_WORKING_RUNS)
            .map(|k| run(&format!("m{k}")))
            .collect();
        for r in &runs {
            v.start(r.clone()).unwrap();
        }
        // Cancelled: its model is free, its thread still counts.
        *runs[0].state.lock().unwrap() = RunState::Cancelled { by: "x".into() };
        let e = v.start(run("m0")).unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.contains("still working"), "{}", e.message);
        assert!(e.retry_after.is_some());
        // Its thread ends: a place again.
        Validation::ended(&v.working);
        v.start(run("m0")).unwrap();
        assert!(v.start(run("m9")).is_err());
    }

    /// Red-team finding: the run table forgot its oldest run after 256 later ones even while
    /// it was running (its owner got 404 for it, and its model took a second run). Finished
    /// runs are forgotten first; a running one stays. And at shutdown every running run is
    /// stopped.
    #[test]
    fn a_running_run_is_never_forgotten_and_shutdown_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let v = Validation::new(None, dir.path(), 1 << 20, Default::default());
        let long = run("long");
        v.start(long.clone()).unwrap();
        for k in 0..(KEPT_RUNS + 10) {
            let quick = run(&format!("q{k}"));
            v.start(quick.clone()).unwrap();
            *quick.state.lock().unwrap() = RunState::Failed { error: "x".into() };
            quick.ended.store(true, Ordering::Relaxed);
            Validation::ended(&v.working);
        }
        assert!(v.get(&long.id).is_some(), "a running run was forgotten");
        assert!(v.runs.lock().unwrap().len() <= KEPT_RUNS);
        let e = v.start(run("long")).unwrap_err();
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert_eq!(v.stop_all(), 1);
        assert!(long.progress.cancelled.load(Ordering::Relaxed));
        assert!(matches!(
            *long.state.lock().unwrap(),
            RunState::Cancelled { .. }
        ));
        assert_eq!(v.working(), 1, "its thread still counts until it ends");
    }
}
