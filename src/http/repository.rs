//! Triton's model repository extension: index, load, unload. Load and unload change what
//! is served, so they need the admin role (checked by `auth::enforce`, see `auth::ROUTES`).

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use nightingale_models::ModelState;
use serde_json::json;

use super::{AppError, AppState, read_body};

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
        v.get("ready")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    let repository = state.repository.clone();
    let entries = tokio::task::spawn_blocking(move || repository.index())
        .await
        .map_err(|e| AppError::internal(e.to_string()))?;
    let rows: Vec<_> = entries
        .into_iter()
        .filter(|e| !ready_only || e.state == ModelState::Ready)
        .map(|e| {
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
            row
        })
        .collect();
    Ok(Json(json!(rows)))
}

pub async fn load(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, AppError> {
    read_body(&headers, body, CONTROL_BODY_LIMIT).await?;
    let repository = state.repository.clone();
    let versions = tokio::task::spawn_blocking(move || repository.load(&model))
        .await
        .map_err(|e| AppError::internal(e.to_string()))??;
    tracing::info!(?versions, "model loaded through the repository API");
    Ok(Json(json!({})))
}

pub async fn unload(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, AppError> {
    read_body(&headers, body, CONTROL_BODY_LIMIT).await?;
    // The repository's locks are std locks: take them off the async runtime's threads.
    let repository = state.repository.clone();
    tokio::task::spawn_blocking(move || repository.unload(&model))
        .await
        .map_err(|e| AppError::internal(e.to_string()))??;
    Ok(Json(json!({})))
}
