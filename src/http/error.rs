//! The one place errors become HTTP statuses: `{"error": "<message>"}` bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nightingale_inference::InferenceError;
use nightingale_models::RepositoryError;

/// An error answered to the client.
#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub message: String,
}

impl AppError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        AppError {
            status,
            message: message.into(),
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
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<InferenceError> for AppError {
    fn from(e: InferenceError) -> Self {
        if e.is_client_error() {
            return AppError::bad_request(e.to_string());
        }
        match e {
            InferenceError::Overloaded { .. } => {
                AppError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            InferenceError::Unavailable => {
                AppError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
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
            RepositoryError::Bundle(_) => StatusCode::BAD_REQUEST,
            RepositoryError::Io { .. } => return AppError::internal(e.to_string()),
        };
        AppError::new(status, e.to_string())
    }
}
