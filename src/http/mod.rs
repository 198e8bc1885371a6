//! The HTTP layer: one router, built in [`app`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bytes::Bytes;
use metrics_exporter_prometheus::PrometheusHandle;
use nightingale_models::Repository;

use crate::audit::AuditLog;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

mod codec;
mod error;
mod metrics;
mod repository;
mod v2;

pub use error::AppError;
pub use metrics::install_recorder;

/// HTTP settings.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Bearer token for the model-control endpoints; `None` disables them.
    pub admin_token: Option<String>,
    /// Whole-request deadline (reading the body, queueing, inference, answer): a client that
    /// trickles its body or a request stuck behind a slow model gets 408 instead of holding
    /// resources forever.
    pub request_timeout: std::time::Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 64 << 20,
            admin_token: None,
            request_timeout: std::time::Duration::from_secs(120),
        }
    }
}

/// When the whole-request deadline fires: handlers that must record what happened to a
/// request they may not finish (the audit trail) read it from the request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct RequestDeadline(pub std::time::Instant);

/// What every handler shares.
pub struct AppState {
    pub repository: Arc<Repository>,
    pub audit: AuditLog,
    pub config: HttpConfig,
    pub metrics: Option<PrometheusHandle>,
    ready: AtomicBool,
}

impl AppState {
    pub fn new(
        repository: Arc<Repository>,
        audit: AuditLog,
        config: HttpConfig,
        metrics: Option<PrometheusHandle>,
    ) -> Arc<Self> {
        Arc::new(AppState {
            repository,
            audit,
            config,
            metrics,
            ready: AtomicBool::new(false),
        })
    }

    /// Marks the initial model load as done: `GET /v2/health/ready` answers 200 from now on.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// The whole router.
pub fn app(state: Arc<AppState>) -> Router {
    let timeout = state.config.request_timeout;
    let v2 = Router::new()
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2/models/stats", get(v2::all_stats))
        .route("/v2/models/{model}", get(v2::model_metadata))
        .route("/v2/models/{model}/ready", get(v2::model_ready))
        .route("/v2/models/{model}/infer", post(v2::infer))
        .route("/v2/models/{model}/stats", get(v2::model_stats))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(v2::model_metadata_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(v2::model_ready_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(v2::infer_version),
        )
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(v2::model_stats_version),
        )
        .route("/v2/repository/index", post(repository::index))
        .route("/v2/repository/models/{model}/load", post(repository::load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository::unload),
        )
        .route("/metrics", get(metrics::render));
    v2.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn(move |mut req: Request, next: axum::middleware::Next| async move {
            let deadline = tokio::time::Instant::now() + timeout;
            req.extensions_mut().insert(RequestDeadline(deadline.into_std()));
            match tokio::time::timeout_at(deadline, next.run(req)).await {
                Ok(response) => response,
                Err(_) => AppError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the request did not complete within {} ms", timeout.as_millis()),
                )
                .into_response(),
            }
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

async fn not_found() -> AppError {
    AppError::not_found("no such endpoint")
}

async fn method_not_allowed() -> AppError {
    AppError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Reads a body up to the configured limit (413 beyond it).
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, AppError> {
    let too_large = || {
        AppError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let length_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if length_limit || e.to_string().contains("length limit") {
            too_large()
        } else {
            AppError::bad_request(format!("cannot read the request body: {e}"))
        }
    })
}
