use std::path::PathBuf;

use crate::tensor::{DataType, TensorError};

type BoxError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong loading a model or running a request through it.
///
/// Messages name inputs, datatypes and shapes but never tensor contents.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    #[error("unknown input {name:?}; the model's inputs are {expected:?}")]
    UnknownInput { name: String, expected: Vec<String> },
    #[error("input {name:?} is given more than once")]
    DuplicateInput { name: String },
    #[error("missing input {name:?}; the model's inputs are {expected:?}")]
    MissingInput { name: String, expected: Vec<String> },
    #[error("input {name:?} has datatype {got} but the model expects {expected}")]
    DataTypeMismatch {
        name: String,
        expected: DataType,
        got: DataType,
    },
    #[error("input {name:?} has shape {got:?} but the model expects {expected:?} (-1 = any size)")]
    ShapeMismatch {
        name: String,
        expected: Vec<i64>,
        got: Vec<usize>,
    },
    #[error("inputs disagree on the batch size (first dimension): {sizes:?}")]
    InconsistentBatch { sizes: Vec<usize> },
    #[error("batch size {got} is larger than this model's max_batch_size {max}")]
    BatchTooLarge { got: usize, max: usize },
    #[error("unknown output {name:?}; the model's outputs are {expected:?}")]
    UnknownOutput { name: String, expected: Vec<String> },
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error("the {backend} backend does not support datatype {datatype}")]
    UnsupportedDataType {
        backend: &'static str,
        datatype: DataType,
    },
    #[error(
        "input {name:?} holds NaN or infinite values (or numbers beyond its datatype's range); this model accepts finite numbers only"
    )]
    NonFinite { name: String },
    /// The engines take BYTES as text (ONNX strings): an element that is not UTF-8 would be
    /// changed on the way in (it was, silently, to U+FFFD), so it is refused.
    #[error(
        "input {name:?} element {index} is not UTF-8 text; this model's BYTES inputs are strings"
    )]
    NotText { name: String, index: usize },
    #[error("batch size 0: a request must carry at least one row")]
    EmptyBatch,
    /// A dimension of size 0 (other than the batch's, [`InferenceError::EmptyBatch`]): no
    /// data to run, and tract panicked on it, leaving its state to fail the next request (a
    /// review's finding).
    #[error("input {name:?} has shape {shape:?}: a dimension of size 0 holds no data to run")]
    EmptyDimension { name: String, shape: Vec<usize> },
    /// The inputs' sizes fit each input's declared shape but not each other (two inputs
    /// whose dimensions must agree, as the model's graph says).
    #[error("the inputs' sizes do not fit the model together: {reason}")]
    DimensionsDisagree { reason: String },
    #[error(
        "running the model on this input needs at least {needed} bytes of working memory, more than the limit of {limit} bytes (max_inference_bytes); send fewer rows or smaller inputs"
    )]
    WorkingMemory { needed: u64, limit: u64 },
    #[error("the backend panicked while running the model")]
    Panicked,
    #[error("the bundle's declared inputs and outputs do not match the model file: {reason}")]
    MetadataMismatch { reason: String },
    #[error("the model's queue is full ({capacity} requests waiting); retry later")]
    Overloaded { capacity: usize },
    #[error(
        "the model's queue holds its limit of {limit} bytes of input tensors (queue_bytes); retry later"
    )]
    QueueBytesFull { limit: usize },
    #[error(
        "the request has {got} rows; this model takes at most {max} rows per request (max_rows_per_request)"
    )]
    TooManyRows { got: usize, max: usize },
    #[error("the model is not available (unloaded or its worker stopped)")]
    Unavailable,
    #[error("the {backend} backend was not compiled into this build (cargo feature `{backend}`)")]
    BackendNotCompiled { backend: &'static str },
    #[error(
        "the {backend} backend cannot differentiate its model: gradient explanations need a native candle bundle"
    )]
    GradientsUnsupported { backend: &'static str },
    #[error("the request was cancelled: its caller had gone before it finished")]
    Cancelled,
    #[error("cannot load model {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error(
        "the model's output {name:?} has {rows} rows for a batch of {expected}; it cannot be split back to the requests"
    )]
    OutputNotBatched {
        name: String,
        rows: usize,
        expected: usize,
    },
    #[error("inference failed in the {backend} backend")]
    Backend {
        backend: &'static str,
        #[source]
        source: BoxError,
    },
}

impl InferenceError {
    /// True when the request itself was wrong (HTTP 400), as opposed to the server.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            InferenceError::UnknownInput { .. }
                | InferenceError::DuplicateInput { .. }
                | InferenceError::MissingInput { .. }
                | InferenceError::DataTypeMismatch { .. }
                | InferenceError::ShapeMismatch { .. }
                | InferenceError::InconsistentBatch { .. }
                | InferenceError::BatchTooLarge { .. }
                | InferenceError::TooManyRows { .. }
                | InferenceError::EmptyBatch
                | InferenceError::EmptyDimension { .. }
                | InferenceError::DimensionsDisagree { .. }
                | InferenceError::WorkingMemory { .. }
                | InferenceError::NonFinite { .. }
                | InferenceError::NotText { .. }
                | InferenceError::UnknownOutput { .. }
                | InferenceError::Tensor(_)
                | InferenceError::UnsupportedDataType { .. }
        )
    }

    pub(crate) fn backend(
        backend: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        InferenceError::Backend {
            backend,
            source: source.into().into(),
        }
    }

    pub(crate) fn load(
        path: &std::path::Path,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        InferenceError::Load {
            path: path.to_owned(),
            source: source.into().into(),
        }
    }
}
