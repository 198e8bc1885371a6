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
/// threads, and audits what happened. An audit failure is logged and returned as an error
/// after the load (the versions loaded serve: the record is what failed).
pub async fn load(
    state: &Arc<AppState>,
    name: &str,
    target: LoadTarget,
    actor: &str,
    request_id: &str,
) -> Result<Vec<Arc<LoadedModel>>, DeployError> {
    let repository = state.repository.clone();
    let owned = name.to_owned();
    let result = tokio::task::spawn_blocking(move || repository.load_target(&owned, target))
        .await
        .map_err(|e| DeployError::Internal(e.to_string()))?;
    let kind = match target {
        LoadTarget::Policy | LoadTarget::PolicyUnlessPinned => EventKind::ModelLoad,
        LoadTarget::Version(_) => EventKind::ModelRollback,
    };
    let events: Vec<AuditEvent> = match &result {
        Ok(served) => served
            .iter()
            .map(|m| AuditEvent {
                version: m.version.to_string(),
                model_sha256: m.model_sha256.clone(),
                request_id: request_id.to_owned(),
                detail: Some(m.signature.to_string()),
                ..event(kind, name, actor, Outcome::Ok, 200)
            })
            .collect(),
        // Names that are not bundles are not model-control events worth a record, and a
        // load that left a rollback's pin alone did nothing.
        Err(
            RepositoryError::InvalidName { .. }
            | RepositoryError::UnknownModel { .. }
            | RepositoryError::Pinned { .. },
        ) => vec![],
        Err(e) => vec![AuditEvent {
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
            ..event(EventKind::ModelRefused, name, actor, Outcome::Rejected, 400)
        }],
    };
    for e in events {
        if let Err(err) = state.audit.record(e).await {
            tracing::error!(model = name, error = %err, "cannot audit a model-control event");
            return Err(DeployError::Audit(err.to_string()));
        }
    }
    result.map_err(DeployError::Repository)
}

/// Unloads a model and audits it.
pub async fn unload(
    state: &Arc<AppState>,
    name: &str,
    actor: &str,
    request_id: &str,
) -> Result<(), DeployError> {
    let repository = state.repository.clone();
    let owned = name.to_owned();
    tokio::task::spawn_blocking(move || repository.unload(&owned))
        .await
        .map_err(|e| DeployError::Internal(e.to_string()))?
        .map_err(DeployError::Repository)?;
    state
        .audit
        .record(AuditEvent {
            request_id: request_id.to_owned(),
            ..event(EventKind::ModelUnload, name, actor, Outcome::Ok, 200)
        })
        .await
        .map_err(|e| DeployError::Audit(e.to_string()))
}

/// Why a model-control action failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Repository(RepositoryError),
    #[error("the action was carried out but its audit record could not be written: {0}")]
    Audit(String),
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
        // A panic inside a load is caught by the repository and reported as the bundle's error.
        if load(state, name, LoadTarget::Policy, STARTUP, "-")
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    tracing::info!(models = names.len(), failed, "initial load finished");
}

/// Watches the repository every `interval`; see the module docs. `seen` starts from what the
/// initial load saw.
pub async fn poll(
    state: Arc<AppState>,
    interval: Duration,
    mut applied: BTreeMap<String, [u8; 32]>,
) {
    let mut previous = applied.clone();
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
            applied.insert(name.clone(), *print);
            // Whether a rollback pinned the model is decided by the repository under its load
            // lock, not here: a rollback in flight now would otherwise be undone by this load
            // queued behind it.
            tracing::info!(model = %name, "bundle changed on disk: reloading unless pinned");
            // Other errors are in the index and the audit trail already.
            if let Err(DeployError::Repository(RepositoryError::Pinned { version, .. })) =
                load(&state, name, LoadTarget::PolicyUnlessPinned, POLLER, "-").await
            {
                tracing::info!(model = %name, version,
                    "bundle changed on disk; not reloaded: pinned by a rollback until the next load");
            }
        }
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
            applied.remove(&name);
            tracing::info!(model = %name, "bundle removed from disk: unloading");
            let _ = unload(&state, &name, POLLER, "-").await;
        }
        previous = now;
    }
}
