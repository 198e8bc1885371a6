//! Triton's model repository extension: index, load, unload. Load and unload change what
//! is served, so they need the admin bearer token.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use nightingale_models::ModelState;
use serde_json::json;
use sha2::{Digest, Sha256};

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

/// Compares the bearer token with the configured one, in constant time over their digests.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    let Some(expected) = &state.config.admin_token else {
        return Err(AppError::new(
            StatusCode::FORBIDDEN,
            "model control is disabled: start the server with --admin-token (NIGHTINGALE_ADMIN_TOKEN)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            AppError::new(
                StatusCode::UNAUTHORIZED,
                "model control needs an Authorization: Bearer token",
            )
        })?;
    let a = Sha256::digest(given.trim().as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if diff != 0 {
        tracing::warn!("model control refused: wrong bearer token");
        return Err(AppError::new(
            StatusCode::UNAUTHORIZED,
            "invalid bearer token",
        ));
    }
    Ok(())
}

pub async fn load(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, AppError> {
    authorize(&state, &headers)?;
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
    authorize(&state, &headers)?;
    read_body(&headers, body, CONTROL_BODY_LIMIT).await?;
    // The repository's locks are std locks: take them off the async runtime's threads.
    let repository = state.repository.clone();
    tokio::task::spawn_blocking(move || repository.unload(&model))
        .await
        .map_err(|e| AppError::internal(e.to_string()))??;
    Ok(Json(json!({})))
}
