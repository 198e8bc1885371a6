//! The one place errors become HTTP statuses: `{"error": "<message>"}` bodies.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nightingale_inference::InferenceError;
use nightingale_models::RepositoryError;
use serde::de::DeserializeOwned;

/// An error answered to the client.
#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds a client should wait before retrying (`Retry-After`), for load refusals.
    pub retry_after: Option<u32>,
}

/// What `Retry-After` says when the server refuses work for lack of room (seconds).
pub const RETRY_AFTER_SECS: u32 = 1;

/// What `Retry-After` says for a model that is not ready (loading takes seconds).
pub const NOT_READY_RETRY_AFTER_SECS: u32 = 5;

/// The longest message an error carries (bytes). Messages quote what the client sent (a
/// model name, a shape): one of 16,000 characters made a gRPC trailer larger than clients
/// accept (8 KiB), which they report as RESOURCE_EXHAUSTED instead of the real error, and a
/// shape of a million dimensions a 3 MB HTTP error body.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Where to cut `text` to keep at most `keep` bytes on a character boundary; `None` when it
/// is that short already.
pub(crate) fn cut_point(text: &str, keep: usize) -> Option<usize> {
    if text.len() <= keep {
        return None;
    }
    let mut end = keep;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(end)
}

/// `message` cut to [`MAX_MESSAGE_BYTES`] (on a character boundary), saying so.
fn bounded(mut message: String) -> String {
    if let Some(end) = cut_point(&message, MAX_MESSAGE_BYTES) {
        let total = message.len();
        message.truncate(end);
        message.push_str(&format!("… (message cut at {end} of {total} bytes)"));
    }
    message
}

impl AppError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AppError {
            status,
            message: bounded(message.into()),
            retry_after: None,
        }
    }

    /// 503 with `Retry-After`: the server is too busy for this request now, not broken.
    pub fn overloaded(message: impl Into<String>) -> Self {
        AppError {
            retry_after: Some(RETRY_AFTER_SECS),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// A server fault: the details go to the log, the client gets a generic message.
    pub fn internal(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        tracing::error!(error = %detail, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The gRPC answer of an error: the code gRPC's HTTP mapping gives the status (400 →
/// INVALID_ARGUMENT, 401 → UNAUTHENTICATED, 403 → PERMISSION_DENIED, 404 → NOT_FOUND, 408 →
/// DEADLINE_EXCEEDED, 413 and 429 → RESOURCE_EXHAUSTED, 503 → UNAVAILABLE, ...), the same
/// message, and `retry-after` in the trailers for load refusals.
#[cfg(feature = "grpc")]
impl From<AppError> for tonic::Status {
    fn from(e: AppError) -> Self {
        use tonic::Code;
        let code = match e.status {
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED => Code::Unimplemented,
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
            StatusCode::CONFLICT => Code::Aborted,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => {
                Code::ResourceExhausted
            }
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            s if s.is_client_error() => Code::FailedPrecondition,
            _ => Code::Internal,
        };
        let mut status = tonic::Status::new(code, e.message);
        if let Some(secs) = e.retry_after {
            status
                .metadata_mut()
                .insert("retry-after", tonic::metadata::MetadataValue::from(secs));
        }
        status
    }
}

impl From<InferenceError> for AppError {
    fn from(e: InferenceError) -> Self {
        if e.is_client_error() {
            return AppError::bad_request(e.to_string());
        }
        match e {
            InferenceError::Overloaded { .. } | InferenceError::QueueBytesFull { .. } => {
                AppError::overloaded(e.to_string())
            }
            InferenceError::Unavailable => {
                AppError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            InferenceError::GradientsUnsupported { .. } => {
                AppError::new(StatusCode::NOT_IMPLEMENTED, e.to_string())
            }
            other => {
                // Backend failures: log the whole chain, answer without internals.
                let mut detail = other.to_string();
                let mut source = std::error::Error::source(&other);
                while let Some(s) = source {
                    detail.push_str(": ");
                    detail.push_str(&s.to_string());
                    source = s.source();
                }
                tracing::error!(error = %detail, "inference failed");
                AppError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string())
            }
        }
    }
}

impl From<RepositoryError> for AppError {
    fn from(e: RepositoryError) -> Self {
        let status = match &e {
            RepositoryError::UnknownModel { .. } | RepositoryError::UnknownVersion { .. } => {
                StatusCode::NOT_FOUND
            }
            RepositoryError::InvalidName { .. } => StatusCode::BAD_REQUEST,
            RepositoryError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            RepositoryError::Pinned { .. } | RepositoryError::Held { .. } => StatusCode::CONFLICT,
            RepositoryError::CommitRefused { .. } => StatusCode::SERVICE_UNAVAILABLE,
            // The server could not record the release: not the bundle's fault.
            RepositoryError::Bundle(nightingale_models::BundleError::ReleaseLedger { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RepositoryError::Bundle(_) => StatusCode::BAD_REQUEST,
            RepositoryError::Io { .. } => return AppError::internal(e.to_string()),
        };
        let mut error = AppError::new(status, e.to_string());
        // A model not ready (loading, unloaded, refused) may be ready later: say when to
        // ask again, as for a full queue (the README promises it for every such 503).
        if matches!(e, RepositoryError::NotReady { .. }) {
            error.retry_after = Some(NOT_READY_RETRY_AFTER_SECS);
        }
        error
    }
}

/// `axum::extract::Path` whose rejections (a segment that is not UTF-8 once percent-decoded,
/// a missing parameter) answer in the `{"error": ...}` shape like every other error.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // An empty segment (`/versions//ready`) names nothing: it is not the default version.
        if let Ok(raw) = axum::extract::RawPathParams::from_request_parts(parts, state).await
            && let Some((key, _)) = raw.iter().find(|(_, v)| v.is_empty())
        {
            return Err(AppError::not_found(format!("empty {key} in the path")));
        }
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(AppError::new(rejection.status(), rejection.body_text())),
        }
    }
}

impl From<crate::deploy::DeployError> for AppError {
    fn from(e: crate::deploy::DeployError) -> Self {
        match e {
            crate::deploy::DeployError::Repository(e) => e.into(),
            crate::deploy::DeployError::AuditUnavailable(_) => {
                AppError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            other => AppError::internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_on_a_character_boundary_and_say_so() {
        let short = AppError::bad_request("unknown model wdbc");
        assert_eq!(short.message, "unknown model wdbc");
        // Two-byte characters across the cut.
        let long = AppError::not_found(format!("unknown model {}", "é".repeat(20_000)));
        assert!(
            long.message.len() < MAX_MESSAGE_BYTES + 64,
            "{}",
            long.message.len()
        );
        assert!(long.message.starts_with("unknown model é"));
        assert!(
            long.message.ends_with("of 40014 bytes)"),
            "{}",
            long.message
        );
    }
}
