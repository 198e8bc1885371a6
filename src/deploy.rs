//! Model control with an audit trail: loads, rollbacks and unloads (from the repository API,
//! the repository poller or start-up) each leave a record naming the actor, the versions, the
//! model file's SHA-256 and the signature checked; a refused bundle leaves one with the reason.
//!
//! The poller watches the repository folder (polling, not inotify: it works the same on local
//! disks, NFS and container volumes, and a repository is a handful of folders). A bundle whose
//! files changed is reloaded once they have stayed the same for one poll interval (a copy in
//! progress is not loaded half-written); a new version that verifies and passes its self-test
//! is swapped in atomically, one that fails leaves the old versions serving and shows in the
//! index with its reason. A bundle removed from disk is unloaded (requests in flight finish).
//! A model pinned by a rollback is left alone until the next plain load (decided under the
//! repository's load lock, so a reload queued behind a rollback in flight does not undo it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nightingale_models::{LoadTarget, LoadedModel, RepositoryError};

use crate::audit::{AuditEvent, EventKind, Outcome};
use crate::http::AppState;

/// The actor of the poller's loads and unloads.
pub const POLLER: &str = "repository-poller";
/// The actor of the initial load.
pub const STARTUP: &str = "startup";

fn event(kind: EventKind, model: &str, actor: &str, outcome: Outcome, status: u16) -> AuditEvent {
    AuditEvent {
        kind,
        request_id: "-".into(),
        model: model.to_owned(),
        version: String::new(),
        model_sha256: String::new(),
        input_sha256: None,
        output_sha256: None,
        rows: None,
        status,
        outcome,
        actor: Some(actor.chars().take(256).collect()),
        detail: None,
    }
}

/// Loads a model (its policy's versions, or one version for a rollback) off the async
/// threads, and audits what happened. The record of each version that starts serving is
/// written before the swap, under the repository's lock: if it cannot be written, nothing
/// changes and the answer says so ([`DeployError::AuditUnavailable`]), so no version ever
/// serves without its record. A refused load leaves what served before serving; its record
/// is written after (if that fails, the refusal is still answered and the failure logged).
pub async fn load(
    state: &Arc<AppState>,
    name: &str,
    target: LoadTarget,
    actor: &str,
    request_id: &str,
) -> Result<Vec<Arc<LoadedModel>>, DeployError> {
    load_release(state, name, target, None, actor, request_id).await
}

/// [`load`], and with `release` an operator's leave to serve that release of the bundle's
/// manifest even if older than the one served before (`nightingale_models::releases`):
/// the load's records say so.
pub async fn load_release(
    state: &Arc<AppState>,
    name: &str,
    target: LoadTarget,
    release: Option<u64>,
    actor: &str,
    request_id: &str,
) -> Result<Vec<Arc<LoadedModel>>, DeployError> {
    let kind = match target {
        // The poller's load of a model pinned to a version that does not serve loads that
        // version (the repository decides it under its load lock): a rollback's return, as
        // start-up records it (it was recorded as a load: a re-attack's finding).
        LoadTarget::PolicyUnlessPinned
            if state
                .repository
                .pinned(name)
                .is_some_and(|v| !state.repository.serves(name, v)) =>
        {
            EventKind::ModelRollback
        }
        LoadTarget::Policy | LoadTarget::PolicyUnlessPinned => EventKind::ModelLoad,
        LoadTarget::Version(_) => EventKind::ModelRollback,
    };
    let repository = state.repository.clone();
    let audit = state.audit.clone();
    let runtime = tokio::runtime::Handle::current();
    let (owned, actor_owned, request_owned) =
        (name.to_owned(), actor.to_owned(), request_id.to_owned());
    let result = tokio::task::spawn_blocking(move || {
        let commit = |served: &[Arc<LoadedModel>],
                      stopping: &[Arc<LoadedModel>]|
         -> Result<(), String> {
            let starts = served.iter().map(|m| AuditEvent {
                detail: Some(format!(
                    "{}; manifest_sha256={}{}{}",
                    m.signature,
                    m.manifest_sha256,
                    m.manifest
                        .release
                        .map(|r| format!("; release={r}"))
                        .unwrap_or_default(),
                    if release.is_some() && release == m.manifest.release {
                        "; release chosen by the operator (older releases allowed)"
                    } else {
                        ""
                    }
                )),
                ..version_event(kind, m, &owned, &actor_owned, &request_owned)
            });
            // The versions this load stops serving (a version folder removed, a rollback to
            // one version) are recorded too: the trail said nothing of them (a red-team
            // finding: version 2 still served, by the trail, after its folder was removed).
            let stops = stopping.iter().map(|m| AuditEvent {
                detail: Some(match kind {
                    EventKind::ModelRollback => "stopped serving: rolled back".into(),
                    _ => "stopped serving: no longer among the versions the policy serves".into(),
                }),
                ..version_event(
                    EventKind::ModelUnload,
                    m,
                    &owned,
                    &actor_owned,
                    &request_owned,
                )
            });
            for record in starts.chain(stops) {
                // A blocking-pool thread: waiting here holds no async worker.
                runtime
                    .block_on(audit.record(record))
                    .map_err(|e| audit_unavailable(&e.to_string()))?;
            }
            Ok(())
        };
        repository.load_release_committed(&owned, target, release, &commit)
    })
    .await
    .map_err(|e| DeployError::Internal(e.to_string()))?;
    let e = match result {
        Ok(served) => return Ok(served),
        Err(RepositoryError::CommitRefused { reason, .. }) => {
            return Err(DeployError::AuditUnavailable(reason));
        }
        Err(e) => e,
    };
    // Names that are not bundles are not model-control events worth a record, and a load
    // that left a rollback's pin alone did nothing.
    if !matches!(
        e,
        RepositoryError::InvalidName { .. }
            | RepositoryError::UnknownModel { .. }
            | RepositoryError::Pinned { .. }
            | RepositoryError::Held { .. }
    ) {
        let record = AuditEvent {
            version: match target {
                LoadTarget::Version(v) => v.to_string(),
                LoadTarget::Policy | LoadTarget::PolicyUnlessPinned => state
                    .repository
                    .refused_version(name)
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
            },
            request_id: request_id.to_owned(),
            detail: Some(e.to_string()),
            // The status the caller is answered (a refusal for the ledger or a concurrent
            // unload is a 503, recorded as 400: a review's finding).
            ..event(
                EventKind::ModelRefused,
                name,
                actor,
                Outcome::Rejected,
                crate::http::error::AppError::from(e.clone())
                    .status
                    .as_u16(),
            )
        };
        ::metrics::counter!("nightingale_model_load_refusals_total", "model" => name.to_owned())
            .increment(1);
        if let Err(err) = state.audit.record(record).await {
            // Nothing changed: what served before serves. The refusal is answered.
            tracing::error!(model = name, error = %err, "cannot audit a refused load");
        }
    }
    Err(DeployError::Repository(e))
}

/// A model-control record of one version: its number and its model file's SHA-256.
fn version_event(
    kind: EventKind,
    m: &LoadedModel,
    name: &str,
    actor: &str,
    request_id: &str,
) -> AuditEvent {
    AuditEvent {
        version: m.version.to_string(),
        model_sha256: m.model_sha256.clone(),
        request_id: request_id.to_owned(),
        ..event(kind, name, actor, Outcome::Ok, 200)
    }
}

fn audit_unavailable(error: &str) -> String {
    format!("its audit record could not be written ({error}); nothing was changed")
}

/// Unloads a model and audits it: the record is written before the model stops serving
/// (under the repository's lock); if it cannot be, the model keeps serving
/// ([`DeployError::AuditUnavailable`]).
pub async fn unload(
    state: &Arc<AppState>,
    name: &str,
    actor: &str,
    request_id: &str,
) -> Result<(), DeployError> {
    let repository = state.repository.clone();
    let audit = state.audit.clone();
    let runtime = tokio::runtime::Handle::current();
    let owned = name.to_owned();
    let (actor_owned, request_owned) = (actor.to_owned(), request_id.to_owned());
    let hold = actor != POLLER;
    let result = tokio::task::spawn_blocking(move || {
        // One record per version that stops serving, with its number and file's SHA-256
        // (a red-team finding: the record named neither, so a recall did not say what it
        // took out of service); one without a version when none served (an operator's
        // unload of a model that serves nothing still holds it unloaded).
        let commit = |stopping: &[Arc<LoadedModel>]| -> Result<(), String> {
            let records: Vec<AuditEvent> = if stopping.is_empty() {
                vec![AuditEvent {
                    request_id: request_owned.clone(),
                    ..event(
                        EventKind::ModelUnload,
                        &owned,
                        &actor_owned,
                        Outcome::Ok,
                        200,
                    )
                }]
            } else {
                stopping
                    .iter()
                    .map(|m| {
                        version_event(
                            EventKind::ModelUnload,
                            m,
                            &owned,
                            &actor_owned,
                            &request_owned,
                        )
                    })
                    .collect()
            };
            for record in records {
                runtime
                    .block_on(audit.record(record))
                    .map_err(|e| audit_unavailable(&e.to_string()))?;
            }
            Ok(())
        };
        // An operator's unload (a recall) holds until an operator loads the model again; the
        // poller's (the bundle left the disk) does not.
        repository.unload_committed(&owned, hold, &commit)
    })
    .await
    .map_err(|e| DeployError::Internal(e.to_string()))?;
    match result {
        Ok(()) => Ok(()),
        Err(RepositoryError::CommitRefused { reason, .. }) => {
            Err(DeployError::AuditUnavailable(reason))
        }
        Err(e) => Err(DeployError::Repository(e)),
    }
}

/// Why a model-control action failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Repository(RepositoryError),
    /// The action's audit record could not be written, so the action was not carried out.
    #[error("the audit trail cannot be written, so the model was not changed: {0}")]
    AuditUnavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The initial load of every bundle, audited with the actor `startup`.
pub async fn load_all(state: &Arc<AppState>) {
    let names = match state.repository.scan() {
        Ok(names) => names,
        Err(e) => {
            tracing::error!(error = %e, "cannot scan the model repository");
            return;
        }
    };
    let mut failed = 0;
    for name in &names {
        // A model a rollback pinned serves its pinned version again (a restart served the
        // version rolled back from: a red-team finding); a plain load lifts the pin.
        let target = match state.repository.persisted_pin(name) {
            Some(v) => {
                tracing::info!(model = %name, version = v, "pinned by an earlier rollback: serving that version");
                LoadTarget::Version(v)
            }
            None => LoadTarget::Policy,
        };
        // A panic inside a load is caught by the repository and reported as the bundle's error.
        if load(state, name, target, STARTUP, "-").await.is_err() {
            failed += 1;
            // A pinned version that did not load leaves the model unavailable: say why, and
            // how to lift the pin (a review's finding: nothing named the pin).
            if let LoadTarget::Version(v) = target {
                tracing::warn!(model = %name, version = v,
                    "the version a rollback pinned did not load: the model stays pinned to it (loaded when its files are back); a load without a version lifts the pin");
            }
        }
    }
    tracing::info!(models = names.len(), failed, "initial load finished");
}

/// Logs a poller's load that a rollback's pin or an operator's unload kept from loading.
fn say_if_not_reloaded<T>(name: &str, why: &str, outcome: &Result<T, DeployError>) {
    match outcome {
        Err(DeployError::Repository(RepositoryError::Pinned { version, .. })) => {
            tracing::info!(model = %name, version,
                "{why}; not reloaded: pinned by a rollback until the next load");
        }
        Err(DeployError::Repository(RepositoryError::Held { .. })) => {
            tracing::info!(model = %name,
                "{why}; not reloaded: unloaded by model control until the next load");
        }
        _ => {}
    }
}

/// The first and the longest wait before a failed load is tried again by the poller.
const MIN_RETRY_DELAY: Duration = Duration::from_secs(5);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Watches the repository every `interval`; see the module docs. `seen` starts from what the
/// initial load saw.
pub async fn poll(
    state: Arc<AppState>,
    interval: Duration,
    mut applied: BTreeMap<String, [u8; 32]>,
) {
    let mut previous = applied.clone();
    // Bundles whose load failed for a reason of the moment (the audit trail or the release
    // ledger could not be written, an internal error): tried again after a delay that doubles, up to
    // `MAX_RETRY_DELAY`, instead of never (the fingerprint was marked applied whatever the
    // outcome: a red-team finding).
    let mut retry: BTreeMap<String, (tokio::time::Instant, Duration)> = BTreeMap::new();
    // The deployment policy's evidence each refused model was last loaded again for.
    let mut tried_evidence: BTreeMap<String, [u8; 32]> = BTreeMap::new();
    // Bundles whose folder is there without a `bundle.toml` file: said once, kept serving.
    let mut without_manifest: std::collections::BTreeSet<String> = Default::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let repository = state.repository.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || repository.fingerprints()).await else {
            continue;
        };
        for (name, print) in &now {
            let stable = previous.get(name) == Some(print);
            if applied.get(name) == Some(print) || !stable {
                continue;
            }
            if let Some((at, _)) = retry.get(name)
                && tokio::time::Instant::now() < *at
            {
                continue;
            }
            applied.insert(name.clone(), *print);
            // Whether a rollback pinned the model is decided by the repository under its load
            // lock, not here: a rollback in flight now would otherwise be undone by this load
            // queued behind it.
            tracing::info!(model = %name, "bundle changed on disk: reloading unless pinned");
            // Other errors are in the index and the audit trail already.
            let outcome = load(&state, name, LoadTarget::PolicyUnlessPinned, POLLER, "-").await;
            // The release ledger that could not be read or written is one too (a red-team
            // finding: a new release stayed unserved after the disk had room again).
            if let Err(
                e @ (DeployError::AuditUnavailable(_)
                | DeployError::Internal(_)
                | DeployError::Repository(_)),
            ) = &outcome
                && !matches!(e, DeployError::Repository(r) if !r.is_of_the_moment())
            {
                let delay = retry
                    .get(name)
                    .map_or(interval.max(MIN_RETRY_DELAY), |(_, d)| *d * 2)
                    .min(MAX_RETRY_DELAY);
                tracing::warn!(model = %name, error = %e, retry_in_secs = delay.as_secs(),
                    "bundle changed on disk; the load failed and will be tried again");
                // Kept in `applied` (a bundle that leaves the disk is still unloaded), under a
                // fingerprint no bundle has, so that it is loaded again once the delay passes.
                applied.insert(name.clone(), [0; 32]);
                retry.insert(name.clone(), (tokio::time::Instant::now() + delay, delay));
                continue;
            }
            retry.remove(name);
            say_if_not_reloaded(name, "bundle changed on disk", &outcome);
        }
        // A model the deployment policy refused is loaded again once the policy's evidence
        // changed (a passing validation report appeared: the bundle's files did not change,
        // so nothing above loads it; a review's finding, was a README known issue).
        let awaiting = state.repository.awaiting_promotion();
        if !awaiting.is_empty() {
            let repository = state.repository.clone();
            if let Ok(Some(evidence)) =
                tokio::task::spawn_blocking(move || repository.promotion_evidence()).await
            {
                for (name, seen) in awaiting {
                    // Once per change of the evidence: a load that ends pinned or held
                    // leaves the refusal as it was.
                    if seen == evidence
                        || !now.contains_key(&name)
                        || tried_evidence.get(&name) == Some(&evidence)
                    {
                        continue;
                    }
                    tried_evidence.insert(name.clone(), evidence);
                    tracing::info!(model = %name,
                        "validation reports changed: loading again the version the deployment policy refused, unless pinned");
                    let outcome =
                        load(&state, &name, LoadTarget::PolicyUnlessPinned, POLLER, "-").await;
                    say_if_not_reloaded(&name, "validation reports changed", &outcome);
                }
            }
        }
        retry.retain(|name, _| now.contains_key(name));
        without_manifest.retain(|name| {
            let back = now.contains_key(name);
            if back {
                tracing::info!(model = %name, "bundle.toml is back");
            }
            !back
        });
        let gone: Vec<String> = applied
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            // Gone for two polls in a row: unload.
            if previous.contains_key(&name) {
                continue;
            }
            // The folder is there, its `bundle.toml` is not a file (deleted and being written
            // again by a deploy tool, a dangling link, a folder): a bad bundle, not a removed
            // one. The versions it serves go on, as for a manifest that does not verify (it
            // unloaded every version of the model: a review's finding); a manifest back as it
            // was changes nothing, a new one is loaded as any change is.
            if state.repository.root().join(&name).is_dir() {
                if without_manifest.insert(name.clone()) {
                    tracing::warn!(model = %name,
                        "bundle.toml is missing or not a file: the versions loaded keep serving; remove the folder, or unload the model, to stop serving it");
                }
                continue;
            }
            without_manifest.remove(&name);
            applied.remove(&name);
            tracing::info!(model = %name, "bundle removed from disk: unloading");
            let _ = unload(&state, &name, POLLER, "-").await;
        }
        previous = now;
    }
}
