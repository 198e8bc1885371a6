//! Triton's model repository extension: index, load, unload. Load and unload change what
//! is served, so they need the admin role (checked by `auth::enforce`, see `auth::ROUTES`).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use nightingale_models::{LoadTarget, ModelState, SignatureStatus};
use serde_json::json;

use super::auth::Caller;
use super::{AppError, AppState, read_body};
use crate::deploy;

const CONTROL_BODY_LIMIT: usize = 64 << 10;

/// `POST /v2/repository/index`, optional body `{"ready": true}` to list only ready models.
pub async fn index(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, AppError> {
    let body = read_body(&headers, body, CONTROL_BODY_LIMIT).await?;
    let ready_only = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| AppError::bad_request(format!("malformed JSON: {e}")))?;
        let Some(object) = v.as_object() else {
            return Err(AppError::bad_request("the body must be a JSON object"));
        };
        only_keys(object, &["ready"])?;
        match object.get("ready") {
            None => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(_) => return Err(AppError::bad_request("\"ready\" must be true or false")),
        }
    };
    let repository = state.repository.clone();
    let entries = tokio::task::spawn_blocking(move || repository.index())
        .await
        .map_err(|e| AppError::internal(e.to_string()))?;
    let rows: Vec<_> = entries
        .into_iter()
        .filter(|e| !ready_only || e.state == ModelState::Ready)
        .map(index_row)
        .collect();
    Ok(Json(json!(rows)))
}

/// One row of the index: Triton's `name`, `version`, `state`, `reason`, and Nightingale's
/// operator view (engine, signature, self-test, when it started serving or was refused).
fn index_row(e: nightingale_models::IndexEntry) -> serde_json::Value {
    let reason = match &e.state {
        ModelState::Unavailable { reason } => reason.clone(),
        _ => String::new(),
    };
    let mut row = json!({"name": e.name, "state": e.state.as_str(), "reason": reason});
    if let Some(v) = e.version {
        row["version"] = json!(v.to_string());
    }
    if let Some(backend) = e.backend {
        row["backend"] = json!(backend);
    }
    if let Some(signature) = &e.signature {
        row["signature"] = match signature {
            SignatureStatus::Unsigned => json!({"status": "unsigned"}),
            SignatureStatus::Verified { key_id, .. } => {
                json!({"status": "verified", "key_id": key_id})
            }
            SignatureStatus::UntrustedKey { key_id } => {
                json!({"status": "untrusted-key", "key_id": key_id})
            }
        };
    }
    if let Some(selftest) = &e.selftest {
        row["selftest"] = json!(selftest);
    } else if e.state == ModelState::Ready {
        row["selftest"] = json!("none declared");
    }
    if let Some(at) = e.at {
        let key = if e.state == ModelState::Ready {
            "loaded_at"
        } else {
            "refused_at"
        };
        row[key] = json!(humantime::format_rfc3339_seconds(at).to_string());
    }
    if e.pinned {
        row["pinned"] = json!(true);
    }
    row
}

/// `POST /v2/repository/models/{model}/load`. Body (optional): `{"parameters": {"version":
/// "N"}}` rolls back to version N, served alone until the next plain load (a Nightingale
/// extension; Triton's `config`/`file:` parameters are not supported).
pub async fn load(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, AppError> {
    let actor = caller.id;
    let body = read_body(&headers, body, CONTROL_BODY_LIMIT).await?;
    let (target, release) = load_target(&body)?;
    let request_id = request_id(&headers);
    deploy::load_release(&state, &model, target, release, &actor, &request_id).await?;
    Ok(Json(json!({})))
}

/// The load request's target: the version policy, or a rollback to one version; and the
/// release of the manifest the operator allows, when older than the one served before.
fn load_target(body: &[u8]) -> Result<(LoadTarget, Option<u64>), AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((LoadTarget::Policy, None));
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| AppError::bad_request(format!("malformed JSON: {e}")))?;
    let Some(object) = v.as_object() else {
        return Err(AppError::bad_request(
            "the load request must be a JSON object",
        ));
    };
    only_keys(object, &["parameters"])?;
    let parameters = match object.get("parameters") {
        None | Some(serde_json::Value::Null) => return Ok((LoadTarget::Policy, None)),
        Some(serde_json::Value::Object(p)) => p,
        Some(_) => return Err(AppError::bad_request("\"parameters\" must be an object")),
    };
    // A key given twice would be read as its last value (which version a rollback serves
    // must not depend on that): the typed reading refuses duplicates.
    #[derive(serde::Deserialize)]
    struct Top {
        #[serde(default)]
        #[allow(dead_code)]
        parameters: Option<Parameters>,
    }
    #[derive(serde::Deserialize)]
    struct Parameters {
        #[serde(default)]
        #[allow(dead_code)]
        version: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        #[allow(dead_code)]
        release: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Top>(body)
        .map_err(|e| AppError::bad_request(format!("ambiguous load request: {e}")))?;
    let mut target = LoadTarget::Policy;
    let mut release = None;
    for (key, value) in parameters {
        if key != "version" && key != "release" {
            return Err(AppError::bad_request(format!(
                "load parameter {:?} is not supported (only \"version\", to roll back, and \"release\", to serve an older release of the manifest)",
                key.chars().take(64).collect::<String>()
            )));
        }
        let n = match value {
            serde_json::Value::String(s) => nightingale_models::manifest::parse_version(s),
            serde_json::Value::Number(n) => n.as_u64().filter(|&v| v > 0),
            _ => None,
        }
        .ok_or_else(|| {
            AppError::bad_request(format!(
                "parameter {key:?} must be a positive integer of at most 19 digits, e.g. \"1\""
            ))
        })?;
        if key == "version" {
            target = LoadTarget::Version(n);
        } else {
            release = Some(n);
        }
    }
    Ok((target, release))
}

/// An unload takes the whole model: its body may be empty or carry Triton's
/// `unload_dependents` (a model here has no dependents); any other parameter is refused
/// rather than ignored (`{"parameters": {"version": "1"}}` took every version down).
fn check_unload_request(body: &[u8]) -> Result<(), AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| AppError::bad_request(format!("malformed JSON: {e}")))?;
    let Some(object) = v.as_object() else {
        return Err(AppError::bad_request(
            "the unload request must be a JSON object",
        ));
    };
    only_keys(object, &["parameters"])?;
    match object.get("parameters") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::Object(p)) => match p.keys().find(|k| *k != "unload_dependents") {
            None => Ok(()),
            Some(key) => Err(AppError::bad_request(format!(
                "unload parameter {:?} is not supported: an unload takes every version of the model (to serve one version alone, load with {{\"parameters\": {{\"version\": \"N\"}}}})",
                key.chars().take(64).collect::<String>()
            ))),
        },
        Some(_) => Err(AppError::bad_request("\"parameters\" must be an object")),
    }
}

/// A repository request's body names only `allowed` at its top: another key (Triton's
/// `repository_name`, a misspelt `paramters`) is refused, not ignored (a load naming another
/// repository, or a rollback whose `parameters` was misspelt, acted as a plain load: a
/// red-team finding).
fn only_keys(
    object: &serde_json::Map<String, serde_json::Value>,
    allowed: &[&str],
) -> Result<(), AppError> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) if key == "repository_name" => Err(AppError::bad_request(
            "\"repository_name\" is not supported: this server serves one model repository",
        )),
        Some(key) => Err(AppError::bad_request(format!(
            "request key {:?} is not supported (only {})",
            key.chars().take(64).collect::<String>(),
            allowed
                .iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

use super::request_id_of as request_id;

pub async fn unload(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, AppError> {
    let actor = caller.id;
    let body = read_body(&headers, body, CONTROL_BODY_LIMIT).await?;
    check_unload_request(&body)?;
    deploy::unload(&state, &model, &actor, &request_id(&headers)).await?;
    Ok(Json(json!({})))
}
