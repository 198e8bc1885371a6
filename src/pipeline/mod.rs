//! The DICOM pipeline (issue 9): from series received into the spool to results sent back
//! to PACS.
//!
//! ```text
//! spool index ──(assembler: quiet time / count)──> series ready
//!   ──(router: routes, each bundle's [dicom])──> jobs (series × bundle)
//!   ──(runner: decode, preprocess, infer, audit)──> SR + SC files in the results folder
//!   ──(outbox: C-STORE with bounded retries)──> destination, or the dead-letter folder
//! ```
//!
//! Every step's state is in [`store::ResultsStore`] (`<data-dir>/results/results.sqlite3`)
//! and the result files sit in `<data-dir>/results/objects/` before they are sent, so a
//! restart goes on where it stopped: the assembler from its spool cursor, a job that was
//! running runs again, an object not yet acknowledged is sent again.

pub mod outbox;
pub mod process;
pub mod route;
pub mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nightingale_dicom::Spool;
use nightingale_dicom::series::SeriesHeader;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::http::AppState;
use route::{Destination, Match, Route};
use store::{ResultsStore, SeriesRow};

/// What to do when instances arrive for a series already processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Late {
    /// Process the series again (a new result series; the old one is kept, superseded).
    #[default]
    Rerun,
    /// Keep the first results.
    Ignore,
}

/// The pipeline's settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Where results go on the default routes (`--results-destination`; empty: kept only in
    /// the results folder).
    pub destinations: Vec<Destination>,
    /// A series is complete after this long with no new instance (`--series-quiet-secs`).
    pub quiet: Duration,
    /// ... or at once with this many instances.
    pub complete_at: Option<u64>,
    pub late: Late,
    /// This node's AE title when it sends results.
    pub calling_ae_title: String,
    /// Delivery attempts per object before it goes to the dead-letter folder.
    pub max_attempts: u32,
    /// Bound on one whole C-STORE exchange of a result object (`--results-timeout-secs`).
    pub exchange_timeout: Duration,
    /// First retry delay (doubled after each failed attempt, up to `max_backoff`).
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// `<data-dir>/results`.
    pub results_dir: PathBuf,
    /// Configured routes (empty: one per bundle with a `[dicom]` section).
    pub routes: Vec<Route>,
    /// How often the spool index is looked at.
    pub poll: Duration,
    /// How long finished results are kept (the spool's retention; `None`: forever).
    pub retention: Option<Duration>,
    /// How the UIDs of studies, series and result objects appear in the pipeline's audit
    /// records: as ingest's (`--dicom-audit-uids`).
    pub audit_uids: crate::audit::dicom::UidAudit,
}

impl PipelineConfig {
    pub fn new(results_dir: PathBuf) -> PipelineConfig {
        PipelineConfig {
            destinations: Vec::new(),
            quiet: Duration::from_secs(10),
            complete_at: None,
            late: Late::Rerun,
            calling_ae_title: "NIGHTINGALE".into(),
            max_attempts: 100,
            exchange_timeout: outbox::SEND_EXCHANGE_TIMEOUT,
            backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(300),
            results_dir,
            routes: Vec::new(),
            poll: Duration::from_millis(250),
            retention: None,
            audit_uids: crate::audit::dicom::UidAudit::Hash,
        }
    }
}

/// The results store's file in a results folder.
pub const STORE_FILE: &str = "results.sqlite3";

/// Retention of results: jobs finished (done, failed, superseded) before `cutoff`, their
/// objects not waiting to be sent, and those objects' files. `nightingale spool purge` and
/// the server's retention task both call it, with the spool's cutoff.
pub fn purge_results(
    results_dir: &std::path::Path,
    cutoff: std::time::SystemTime,
    dry_run: bool,
) -> Result<store::PurgeCounts, PipelineError> {
    let cutoff_ms = cutoff
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut store = ResultsStore::open(&results_dir.join(STORE_FILE))?;
    let counts = store.purge(cutoff_ms, dry_run)?;
    if !dry_run {
        for file in &counts.files {
            // Only a path the pipeline writes (relative, plain names): a row naming anything
            // else (an edited store) deletes nothing.
            let plain = !file.is_empty()
                && std::path::Path::new(file)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !plain {
                tracing::warn!(
                    "results purge: a stored object names a path the pipeline never writes: nothing deleted for it"
                );
                continue;
            }
            let path = results_dir.join(file);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "results purge: cannot delete a result file: left in place");
                    continue;
                }
            }
            // Empty job folders go too (not an error when others remain); the folders the
            // pipeline writes into stay (a dead letter's parent is the dead-letter folder,
            // which went with its last file: later dead letters were then not kept, a
            // red-team finding).
            if let Some(dir) = path.parent()
                && dir != results_dir.join(outbox::DEAD_LETTER_DIR)
                && dir != results_dir.join(outbox::OBJECTS_DIR)
            {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    Ok(counts)
}

/// The reason a routed series' late instances were not processed.
const LATE_IGNORED: &str = "late instances ignored";

/// The bundles a routed series went without, read from its reason (see [`ROUTED_WITHOUT`]).
pub fn routed_without(reason: &str) -> Vec<&str> {
    reason
        .strip_prefix(ROUTED_WITHOUT)
        .and_then(|r| r.strip_prefix("bundle "))
        .and_then(|r| r.split_once(':'))
        .map(|(names, _)| names.split(", ").collect())
        .unwrap_or_default()
}

/// The start of a routed series' reason when a bundle its routes name got no job (not in
/// the repository then: a folder moved aside during a deployment): the series is listed by
/// `results list`, and `results reprocess` routes it again (it was lost without a record: a
/// re-attack's finding).
pub const ROUTED_WITHOUT: &str = "routed without ";

/// How long after it was made a queued job waits for its bundle to serve before it runs
/// anyway (and fails `bundle_unavailable`): jobs queued when their bundle was unloaded
/// failed at once, for good, and series that arrived meanwhile were left unmatched (a
/// review's findings).
pub const JOB_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Why a bundle's `[dicom]` section refuses a series (its first instance's header, and
/// every calling AE its instances came from), if it does.
pub(crate) fn bundle_refuses(
    accepts: &nightingale_models::manifest::DicomAccepts,
    header: &SeriesHeader,
    instances: &[nightingale_dicom::Stored],
) -> Option<String> {
    let m = Match::of_bundle(accepts);
    let mut aes: Vec<&str> = instances.iter().map(|i| i.calling_ae.as_str()).collect();
    aes.sort_unstable();
    aes.dedup();
    aes.iter()
        .find_map(|ae| m.mismatch(header, ae))
        .or_else(|| route::volume_mismatch(accepts, header, instances.len() as u64))
}

/// A queued job's reason while its bundle is not serving.
pub(crate) fn waiting_for(bundle: &str) -> String {
    format!(
        "waiting for bundle {bundle} to serve (at most {} h after the job was made)",
        JOB_WAIT.as_secs() / 3600
    )
}

/// The UIDs of a pipeline audit record as ingest's records give them: `{name}_sha256=` and
/// the full SHA-256 of each UID's text, space-separated, or nothing where UIDs are omitted
/// (the pipeline's records gave 12-hex-digit prefixes under `*_sha256` names, with `omit`
/// too: a review's finding; an auditor's SHA-256 of a UID did not find them).
pub(crate) fn audit_uids(uids: crate::audit::dicom::UidAudit, pairs: &[(&str, &str)]) -> String {
    if uids == crate::audit::dicom::UidAudit::Omit {
        return String::new();
    }
    pairs
        .iter()
        .map(|(name, uid)| format!("{name}_sha256={}", crate::audit::dicom::uid_sha256(uid)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// An operator's command's words as its record gives them: with UIDs omitted, no
/// `*_sha256=` word but `=*` (every study).
fn operator_detail(uids: crate::audit::dicom::UidAudit, detail: String) -> String {
    if uids != crate::audit::dicom::UidAudit::Omit {
        return detail;
    }
    detail
        .split(' ')
        .filter(|w| !w.contains("_sha256=") || w.ends_with("=*"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A short, non-reversible tag for a UID in logs (UIDs are not written to logs).
pub fn uid_tag(uid: &str) -> String {
    hex::encode(&Sha256::digest(uid.as_bytes())[..6])
}

/// Destinations as a job stores them (`AE@host:port`).
fn names(destinations: &[Destination]) -> impl Iterator<Item = String> + '_ {
    destinations.iter().map(ToString::to_string)
}

/// The running pipeline, shared by its tasks and the results API.
pub struct Pipeline {
    pub config: PipelineConfig,
    pub spool: Arc<Spool>,
    pub state: Arc<AppState>,
    pub store: Arc<Mutex<ResultsStore>>,
    /// Wakes the job runner.
    jobs: Notify,
    /// Wakes the outbox sender.
    outbox: Notify,
    /// Destinations with a delivery under way (each has its own task, so one that stalls
    /// holds only its own objects, for at most the C-STORE exchange bound).
    sending: Mutex<std::collections::BTreeSet<String>>,
    /// Set when the server stops: a delivery under way sends no further object.
    stopping: std::sync::atomic::AtomicBool,
    /// Jobs in a row whose run could not be recorded (the audit trail failing): each waits
    /// longer before it runs again.
    pub(crate) audit_retries: std::sync::atomic::AtomicU32,
}

/// How long a stopping pipeline waits for the C-STOREs under way to be answered.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Aborts its tasks when dropped (the pipeline's workers, with the task that holds them).
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The pipeline could not start.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("results folder {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("results store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("spool index: {0}")]
    Spool(String),
}

impl Pipeline {
    pub fn open(
        config: PipelineConfig,
        spool: Arc<Spool>,
        state: Arc<AppState>,
    ) -> Result<Arc<Pipeline>, PipelineError> {
        for dir in [
            config.results_dir.clone(),
            config.results_dir.join(outbox::OBJECTS_DIR),
            config.results_dir.join(outbox::DEAD_LETTER_DIR),
        ] {
            std::fs::create_dir_all(&dir)
                .and_then(|()| nightingale_dicom::spool::narrow(&dir, 0o700))
                .map_err(|source| PipelineError::Io {
                    path: dir.clone(),
                    source,
                })?;
        }
        let store = ResultsStore::open(&config.results_dir.join(STORE_FILE))?;
        let requeued = store.requeue_interrupted()?;
        if requeued > 0 {
            tracing::info!(
                jobs = requeued,
                "pipeline: jobs interrupted by the last stop queued again"
            );
        }
        // Before anything is received: a cursor past the highest arrival number the spool
        // ever gave (an index whose rowids were reused before it had arrival numbers, or a
        // spool replaced) would skip the next instances; it restarts from that number.
        let high = spool
            .arrival_high()
            .map_err(|e| PipelineError::Spool(e.to_string()))?;
        let cursor = store.cursor()?;
        if cursor > high {
            tracing::warn!(
                cursor,
                high,
                "pipeline cursor past the spool's last arrival: restarting from it"
            );
            store.set_cursor(high)?;
        }
        Ok(Arc::new(Pipeline {
            config,
            spool,
            state,
            store: Arc::new(Mutex::new(store)),
            jobs: Notify::new(),
            outbox: Notify::new(),
            sending: Mutex::new(Default::default()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            audit_retries: std::sync::atomic::AtomicU32::new(0),
        }))
    }

    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, ResultsStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the assembler, the job runner and the outbox until `shutdown` completes, then
    /// stops them: no series is routed and no job or delivery started any more (a job cut
    /// short runs again at the next start, as after a crash), and the C-STOREs under way are
    /// answered and recorded before this returns, within [`SHUTDOWN_GRACE`]. It ran on while
    /// the server drained and was then dropped in the middle of a C-STORE, and the result
    /// the PACS had stored was sent again at the next start, at every routine restart (a
    /// review's finding).
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        // Series are routed, and jobs run, only once the initial model load is done: at a
        // restart with series waiting, routing before the bundles were loaded left them
        // unmatched ("no route") and failed the interrupted jobs ("unknown model") for good
        // (a review's finding). Results waiting to be sent go at once.
        let sender = tokio::spawn(self.clone().send_forever());
        let operators = tokio::spawn(self.clone().audit_operators_forever());
        let me = self.clone();
        let work = tokio::spawn(async move {
            if !me.state.is_ready() {
                tracing::info!("DICOM pipeline: waiting for the initial model load");
                while !me.state.is_ready() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            me.check_routes();
            let assembler = tokio::spawn(me.clone().assemble_forever());
            let runner = tokio::spawn(me.clone().run_jobs_forever());
            let kept = tokio::spawn(me.clone().keep_missing_results_in_spool());
            let _abort = AbortOnDrop(vec![
                assembler.abort_handle(),
                runner.abort_handle(),
                kept.abort_handle(),
            ]);
            let _ = tokio::join!(assembler, runner, kept);
        });
        let _abort = AbortOnDrop(vec![
            sender.abort_handle(),
            work.abort_handle(),
            operators.abort_handle(),
        ]);
        shutdown.await;
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        sender.abort();
        work.abort();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let mut said = false;
        while !self.busy_destinations().is_empty() && tokio::time::Instant::now() < deadline {
            if !said {
                tracing::info!(
                    "DICOM pipeline: stopping once the deliveries under way are answered"
                );
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.busy_destinations().is_empty() {
            tracing::warn!(
                grace_secs = SHUTDOWN_GRACE.as_secs(),
                "DICOM pipeline: a delivery still under way at the end of the shutdown grace is cut; its object is sent again at the next start"
            );
        }
    }

    /// Whether the server is stopping ([`Pipeline::run`]'s shutdown came).
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Once the initial models are loaded: a warning for each route's bundle that is not
    /// served, and each output a route reports that its bundle does not have (every
    /// matching series would otherwise end unmatched, or failed with a reason naming the
    /// bundle, with nothing said at start: a red-team finding). Not an error: a bundle may
    /// be deployed later.
    fn check_routes(&self) {
        // Two routes that run one bundle to one destination send that PACS two result sets
        // of a series both match (a red-team pass: four objects for one series, said
        // nowhere). Allowed (their matchers may not overlap), and said.
        let routes = self.routes();
        let mut sends: std::collections::BTreeMap<(String, String), String> =
            std::collections::BTreeMap::new();
        for route in &routes {
            for bundle in &route.bundles {
                for destination in &route.destinations {
                    let key = (bundle.clone(), destination.to_string());
                    match sends.get(&key) {
                        Some(first) if *first != route.name => tracing::warn!(
                            routes = %format!("{first}, {}", route.name),
                            bundle = %bundle,
                            destination = %destination,
                            "two routes run this bundle to this destination: a series both match is sent two result sets"
                        ),
                        Some(_) => {}
                        None => {
                            sends.insert(key, route.name.clone());
                        }
                    }
                }
            }
        }
        for route in routes {
            for bundle in &route.bundles {
                let Ok(model) = self.state.repository.get(bundle, None) else {
                    tracing::warn!(
                        route = %route.name,
                        bundle = %bundle,
                        "route names a bundle that is not being served: its jobs wait for it to serve (up to 24 h), and one the repository does not hold gets none"
                    );
                    continue;
                };
                if model.manifest.dicom.is_none() {
                    tracing::warn!(
                        route = %route.name,
                        bundle = %bundle,
                        "route names a bundle that declares no [dicom] section (not an imaging bundle): its series will be unmatched"
                    );
                }
                for output in &route.report {
                    if !model.manifest.outputs.iter().any(|o| &o.name == output) {
                        tracing::warn!(
                            route = %route.name,
                            bundle = %bundle,
                            output = %output,
                            "route reports an output its bundle does not have: its jobs will fail"
                        );
                    }
                }
            }
        }
    }

    /// At start-up: the done jobs' result objects the spool does not hold (a store refused
    /// for want of room, or a stop between a job's end and its objects' store; a review's
    /// finding: they were never added, so QIDO-RS never listed them), within the retention
    /// window, are stored in it now.
    async fn keep_missing_results_in_spool(self: Arc<Self>) {
        let me = self.clone();
        let added = tokio::task::spawn_blocking(move || -> Result<usize, String> {
            let since = me
                .config
                .retention
                .map_or(0, |r| store::now_ms().saturating_sub(r.as_millis() as i64));
            // Nor what a purge deleted on purpose: results of jobs that ended before its
            // cutoff came back into the spool at the next start, received anew (a review's
            // finding).
            let purged_before = me.spool.purged_before_ms().map_err(|e| e.to_string())?;
            let since = since.max(purged_before.unwrap_or(0));
            let objects = me
                .store()
                .done_objects_since(since)
                .map_err(|e| e.to_string())?;
            let mut added = 0;
            for (study, series, sop, path) in objects {
                if me
                    .spool
                    .instance(&study, &series, &sop)
                    .map_err(|e| e.to_string())?
                    .is_some()
                {
                    continue;
                }
                match process::keep_result_file(&me.spool, &me.config.results_dir.join(&path)) {
                    Ok(_) => added += 1,
                    Err(e) => tracing::warn!(error = %e,
                        "a result object is still not in the spool: QIDO-RS will not list it"),
                }
            }
            Ok(added)
        })
        .await;
        match added {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(objects = n, "result objects added to the spool"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "result objects not checked against the spool")
            }
            Err(e) => tracing::error!(error = %e, "result objects check panicked"),
        }
    }

    /// Writes the operators' commands the results store kept to the audit trail, at start
    /// and every 5 s ([`ResultsStore::log_operator`]). One the trail refuses is tried again
    /// (a command whose record was written but not then forgotten is written twice).
    async fn audit_operators_forever(self: Arc<Self>) {
        loop {
            let me = self.clone();
            let kept = tokio::task::spawn_blocking(move || me.store().operator_commands(64)).await;
            match kept {
                Ok(Ok(commands)) => {
                    for (id, at_ms, by, detail) in commands {
                        let mut event = crate::audit::AuditEvent::blank(
                            crate::audit::EventKind::OperatorCommand,
                            format!("operator-{at_ms}-{id}"),
                            Some(by.chars().take(256).collect()),
                        );
                        // The command cannot know the server's `--dicom-audit-uids`: with
                        // `omit`, its study's hash is left out here (a re-attack found it in
                        // the trail).
                        let detail = operator_detail(self.config.audit_uids, detail);
                        event.detail = Some(format!("at_ms={at_ms} {detail}"));
                        if let Err(e) = self.state.audit.record(event).await {
                            tracing::warn!(error = %e,
                                "an operator's command is not in the audit trail yet: tried again later");
                            break;
                        }
                        if let Err(e) = self.store().operator_audited(id) {
                            tracing::warn!(error = %e,
                                "an operator's command audited is not marked so: its record may be written again");
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "operators' commands not read"),
                Err(e) => tracing::error!(error = %e, "operators' commands audit panicked"),
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    async fn assemble_forever(self: Arc<Self>) {
        let mut last_purge: Option<std::time::Instant> = None;
        loop {
            if let Some(retention) = self.config.retention
                && last_purge.is_none_or(|t| {
                    t.elapsed()
                        >= (retention / 4)
                            .clamp(Duration::from_millis(100), Duration::from_secs(3600))
                })
            {
                last_purge = Some(std::time::Instant::now());
                let dir = self.config.results_dir.clone();
                let cutoff = std::time::SystemTime::now()
                    .checked_sub(retention)
                    .unwrap_or(std::time::UNIX_EPOCH);
                match tokio::task::spawn_blocking(move || purge_results(&dir, cutoff, false)).await
                {
                    Ok(Ok(c)) if c.jobs + c.series + c.objects > 0 => {
                        tracing::info!(
                            jobs = c.jobs,
                            objects = c.objects,
                            series = c.series,
                            "results retention: old results purged"
                        );
                        let mut event = crate::audit::AuditEvent::blank(
                            crate::audit::EventKind::SpoolPurge,
                            format!("results-purge-{}", store::now_ms()),
                            Some("retention".to_owned()),
                        );
                        event.detail = Some(format!(
                            "event=results-purged cutoff_ms={} result_jobs={} result_objects={} result_series={}",
                            cutoff
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis()),
                            c.jobs,
                            c.objects,
                            c.series
                        ));
                        if let Err(e) = self.state.audit.record(event).await {
                            tracing::warn!(error = %e, "results retention not audited");
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "results retention failed"),
                    Err(e) => tracing::error!(error = %e, "results retention panicked"),
                }
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.assemble_once()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(_)) => self.jobs.notify_one(),
                Ok(Err(e)) => tracing::error!(error = %e, "series assembly failed; retrying"),
                Err(e) => tracing::error!(error = %e, "series assembly panicked; retrying"),
            }
            tokio::time::sleep(self.config.poll).await;
        }
    }

    /// One pass: new index rows → series; series complete → routed. Returns the jobs made.
    pub fn assemble_once(&self) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let cursor = self.store().cursor()?;
        let (touched, next) = self.spool.series_touched_since(cursor, 1000)?;
        {
            let store = self.store();
            for s in &touched {
                store.note_series_at(
                    &s.study_uid,
                    &s.series_uid,
                    s.instances,
                    s.last_received_ms,
                    s.last_row,
                )?;
            }
            if next != cursor {
                store.set_cursor(next)?;
            }
        }
        // The shortest quiet time and smallest count of any route let a series through
        // here; `route_series` then waits for the longest quiet time of the routes that
        // match it.
        let quiet = self
            .config
            .routes
            .iter()
            .filter_map(|r| r.quiet)
            .chain([self.config.quiet])
            .min()
            .unwrap_or(self.config.quiet);
        let complete_at = self
            .config
            .routes
            .iter()
            .filter_map(|r| r.complete_at)
            .chain(self.config.complete_at)
            .min();
        let quiet_before = store::now_ms() - quiet.as_millis() as i64;
        let ready = self.store().series_ready(quiet_before, complete_at, 100)?;
        let mut made = 0;
        for row in ready {
            made += self.route_series(&row)?;
        }
        Ok(made)
    }

    /// Routes one complete series: jobs for every matching route's bundles.
    fn route_series(
        &self,
        row: &SeriesRow,
    ) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let tag = uid_tag(&row.series_uid);
        // Late instances of a series that was routed are ignored; one that was left
        // unmatched or failed is looked at again (it was marked "routed, late instances
        // ignored", its real outcome hidden: a red-team finding).
        let was_routed = row
            .reason
            .as_deref()
            .is_none_or(|r| r == LATE_IGNORED || r.starts_with(ROUTED_WITHOUT));
        if row.routed_instances > 0 && self.config.late == Late::Ignore && was_routed {
            tracing::info!(series = %tag, "late instances ignored (late = ignore)");
            // A bundle it went without stays said (overwritten, the series was lost again:
            // a re-attack's finding).
            let reason = match row.reason.as_deref() {
                Some(r) if r.starts_with(ROUTED_WITHOUT) => r,
                _ => LATE_IGNORED,
            };
            self.store().settle_series(row, "routed", Some(reason))?;
            return Ok(0);
        }
        let instances = self
            .spool
            .series_instances(&row.study_uid, &row.series_uid)?;
        let Some(first) = instances.first() else {
            // Purged meanwhile.
            self.store()
                .settle_series(row, "unmatched", Some("no instances left in the spool"))?;
            return Ok(0);
        };
        // A file that cannot be opened now (out of descriptors, an I/O error of a network
        // file system) is looked at again on the next pass: failed for good, an
        // acknowledged series would never get its results (a red-team finding). Only what
        // opens and does not parse fails the series.
        match std::fs::File::open(&first.path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.store().settle_series(
                    row,
                    "unmatched",
                    Some("no instances left in the spool"),
                )?;
                return Ok(0);
            }
            Err(e) => {
                tracing::warn!(series = %tag, error = %e, "series header cannot be opened now: tried again on the next pass");
                return Ok(0);
            }
        }
        let header = match SeriesHeader::read(&first.path) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(series = %tag, error = %e.detail, "series header unreadable");
                self.store().settle_series(
                    row,
                    "failed",
                    Some("the series' header cannot be read"),
                )?;
                return Ok(0);
            }
        };
        // Nightingale's own results sent back in (a PACS forwarding new objects to every
        // node, or a route to this node's own port): never processed again, or each result
        // would make another, without end.
        if self.store().is_result_series(&row.series_uid)? {
            let reason = "the series is one of this node's own result objects: not processed again";
            self.not_routed(row, &tag, "own_result", "unmatched", reason)?;
            return Ok(0);
        }
        // Study and Series Instance UIDs the results API cannot name (a `/`, `..`: not DICOM
        // UIDs at all, though the spool keeps them under hashed paths) are not processed:
        // results referencing them went to PACS while the operator could neither see nor
        // track them (a review's finding).
        if !(nightingale_dicom::sop::is_url_safe_uid(&row.study_uid)
            && nightingale_dicom::sop::is_url_safe_uid(&row.series_uid))
        {
            let reason = "the Study or Series Instance UID is not 1-64 letters, digits, dots, '-' or '_': not processed (its results could not be named)";
            self.not_routed(row, &tag, "unmatched", "failed", reason)?;
            return Ok(0);
        }
        // The Patient ID's hash, for the CDS imaging cards (the ID itself is not kept).
        self.store()
            .set_patient(row, header.patient_id_sha256.as_deref())?;
        // Every calling AE the series came from: a route by calling AE takes a series only
        // if each of its instances came from an AE it lists (judged by the first to arrive,
        // another AE's images went into a listed AE's job, or a listed AE's series was left
        // unrouted: a red-team finding).
        let calling_aes: std::collections::BTreeSet<&str> =
            instances.iter().map(|i| i.calling_ae.as_str()).collect();
        let mismatch = |m: &route::Match| calling_aes.iter().find_map(|ae| m.mismatch(&header, ae));
        let mut refusals: Vec<String> = Vec::new();
        let mut matching = Vec::new();
        for route in self.routes() {
            match mismatch(&route.matcher) {
                Some(why) => refusals.push(format!("{}: {why}", route.name)),
                None => matching.push(route),
            }
        }
        // A series is complete once every route that matches it says so: its quiet time
        // has passed, or its instance count is reached.
        let now = store::now_ms();
        let wait_until = matching
            .iter()
            .filter_map(|r| {
                r.complete(
                    row.instances,
                    row.last_received_ms,
                    now,
                    self.config.quiet,
                    self.config.complete_at,
                )
                .err()
            })
            .max();
        if let Some(until) = wait_until {
            self.store().defer_series(row, until)?;
            return Ok(0);
        }
        // A bundle that is not serving now (a rollback, an unload and load, a folder moved
        // aside and back) still gets its job when the repository knows it (and, unloaded,
        // its last `[dicom]` takes the series): the job waits in the queue for its bundle
        // (`JOB_WAIT`), and the bundle's `[dicom]` is asked again when it runs. Such series
        // were left unmatched for good (a review's finding); holding the whole series for
        // it held every other bundle's result too (a re-attack's finding).
        let unloaded = self.state.repository.unloaded_imaging();
        let mut missed: Vec<String> = Vec::new();
        let mut made = 0;
        for route in matching {
            for bundle in &route.bundles {
                // The bundle's own [dicom] section has the last word.
                let serving = self.state.repository.get(bundle, None).ok();
                let accepts = match &serving {
                    Some(model) => model.manifest.dicom.clone(),
                    None => unloaded
                        .iter()
                        .find(|(name, _)| name == bundle)
                        .map(|(_, accepts)| accepts.clone()),
                };
                let waits = serving.is_none();
                if waits && !self.state.repository.knows(bundle) {
                    refusals.push(format!(
                        "{}: bundle {bundle} is not in the repository",
                        route.name
                    ));
                    missed.push(bundle.clone());
                    continue;
                }
                match &accepts {
                    Some(accepts) => {
                        if let Some(why) = bundle_refuses(accepts, &header, &instances) {
                            refusals
                                .push(format!("{}: bundle {bundle} refuses: {why}", route.name));
                            continue;
                        }
                    }
                    None if !waits => {
                        refusals.push(format!(
                            "{}: bundle {bundle} declares no [dicom]",
                            route.name
                        ));
                        continue;
                    }
                    // Not serving, never seen serving: its `[dicom]` is asked when it runs.
                    None => {}
                }
                let destinations = route
                    .destinations
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                let id = self.store().add_job(
                    &row.study_uid,
                    &row.series_uid,
                    &route.name,
                    bundle,
                    row.instances,
                    &destinations,
                )?;
                if waits {
                    self.store()
                        .set_job_reason(id, Some(&waiting_for(bundle)))?;
                }
                made += 1;
            }
        }
        if made == 0 {
            let reason = if refusals.is_empty() {
                "no route configured".to_owned()
            } else {
                refusals.join("; ")
            };
            self.not_routed(row, &tag, "unmatched", "unmatched", &reason)?;
        } else {
            tracing::info!(series = %tag, jobs = made, "series routed");
            metrics::counter!("nightingale_pipeline_series_total", "outcome" => "routed")
                .increment(1);
            missed.sort_unstable();
            missed.dedup();
            let reason = (!missed.is_empty()).then(|| {
                format!(
                    "{ROUTED_WITHOUT}bundle {}: not in the repository (`results reprocess` routes it again)",
                    missed.join(", ")
                )
            });
            self.store()
                .settle_series(row, "routed", reason.as_deref())?;
        }
        Ok(made)
    }

    /// Settles a series that is stored and not processed, in `state` with `reason` (logged,
    /// without UIDs), counted under `outcome`.
    fn not_routed(
        &self,
        row: &SeriesRow,
        tag: &str,
        outcome: &'static str,
        state: &str,
        reason: &str,
    ) -> rusqlite::Result<()> {
        tracing::info!(series = %tag, reason, "series not routed: stored, not processed");
        metrics::counter!("nightingale_pipeline_series_total", "outcome" => outcome).increment(1);
        self.store().settle_series(row, state, Some(reason))
    }

    /// Every destination the configuration names now: its routes', or the default ones.
    pub(super) fn configured_destinations(&self) -> std::collections::BTreeSet<String> {
        if self.config.routes.is_empty() {
            return names(&self.config.destinations).collect();
        }
        self.config
            .routes
            .iter()
            .flat_map(|r| names(&r.destinations))
            .collect()
    }

    /// The destinations the configuration names now for the route called `name` (a job's
    /// route), `None` when it names no such route any more. A job sends to these, not to
    /// those of the configuration it was made under: results queued, interrupted or
    /// reprocessed went on to a PACS the operator had removed (a review's finding), and a
    /// PACS added never got a reprocessed study.
    pub(super) fn route_destinations(&self, name: &str) -> Option<Vec<String>> {
        if let Some(route) = self.config.routes.iter().find(|r| r.name == name) {
            return Some(names(&route.destinations).collect());
        }
        (self.config.routes.is_empty() && name.starts_with("bundle:"))
            .then(|| names(&self.config.destinations).collect())
    }

    /// The configured routes, or one per serving bundle with a `[dicom]` section.
    fn routes(&self) -> Vec<Route> {
        if !self.config.routes.is_empty() {
            return self.config.routes.clone();
        }
        let mut names: Vec<String> = self
            .state
            .repository
            .loaded()
            .iter()
            .filter(|m| m.manifest.dicom.is_some())
            .map(|m| m.name.clone())
            .collect();
        // And the imaging bundles unloaded for now (their folder still here): their jobs
        // wait for them.
        names.extend(
            self.state
                .repository
                .unloaded_imaging()
                .into_iter()
                .map(|(name, _)| name),
        );
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| Route {
                name: format!("bundle:{name}"),
                matcher: Match::default(),
                bundles: vec![name],
                destinations: self.config.destinations.clone(),
                quiet: None,
                complete_at: None,
                report: Vec::new(),
            })
            .collect()
    }

    async fn run_jobs_forever(self: Arc<Self>) {
        loop {
            let job = {
                let me = self.clone();
                let mut serving: Vec<String> = me
                    .state
                    .repository
                    .loaded()
                    .iter()
                    .map(|m| m.name.clone())
                    .collect();
                serving.sort_unstable();
                serving.dedup();
                let waited_out = store::now_ms() - JOB_WAIT.as_millis() as i64;
                tokio::task::spawn_blocking(move || me.store().take_job(&serving, waited_out)).await
            };
            match job {
                Ok(Ok(Some(job))) => {
                    self.clone().run_job(job).await;
                    self.outbox.notify_one();
                }
                Ok(Ok(None)) => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), self.jobs.notified()).await;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "results store: cannot take a job");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "job runner panicked");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn send_forever(self: Arc<Self>) {
        loop {
            let wait = match self.clone().send_due().await {
                Ok(Some(next_ms)) => {
                    Duration::from_millis((next_ms - store::now_ms()).clamp(10, 1000) as u64)
                }
                Ok(None) => Duration::from_secs(1),
                Err(e) => {
                    tracing::error!(error = %e, "outbox failed; retrying");
                    Duration::from_secs(1)
                }
            };
            let _ = tokio::time::timeout(wait, self.outbox.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::dicom::UidAudit;

    /// With `--dicom-audit-uids omit`, an operator's command's record names no study (the
    /// command hashed it, not knowing the setting: a re-attack's finding); `*` stays.
    #[test]
    fn operator_commands_follow_the_uid_setting() {
        let detail = "command=results-resend study_sha256=ab12 destination=* objects=2";
        assert_eq!(operator_detail(UidAudit::Hash, detail.into()), detail);
        assert_eq!(
            operator_detail(UidAudit::Omit, detail.into()),
            "command=results-resend destination=* objects=2"
        );
        assert_eq!(
            operator_detail(UidAudit::Omit, "study_sha256=* objects=1".into()),
            "study_sha256=* objects=1"
        );
        assert_eq!(
            audit_uids(UidAudit::Hash, &[("study", "1.2.3")]),
            format!("study_sha256={}", crate::audit::dicom::uid_sha256("1.2.3"))
        );
        assert_eq!(audit_uids(UidAudit::Omit, &[("study", "1.2.3")]), "");
    }
}
