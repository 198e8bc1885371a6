//! Tensors, backends and model workers for Nightingale.
//!
//! The layers, bottom up:
//! - [`Tensor`] / [`DataType`]: dense tensors of the KServe v2 datatypes over `ndarray`.
//! - [`Backend`]: a small synchronous, object-safe trait that runs a loaded model. Backends:
//!   `tract` (pure Rust, the default) and `ort` (ONNX Runtime, loaded at run time from
//!   `ORT_DYLIB_PATH`, behind the `ort` feature) run ONNX files; `candle` (pure Rust, default
//!   feature `candle`) runs native architectures from safetensors weights and is the one that
//!   gives gradients ([`Backend::gradients`]: Grad-CAM, integrated gradients).
//! - [`ModelWorker`]: OS threads that each own one backend instance, fed by one bounded queue
//!   with dynamic batching. Async callers submit and await a oneshot answer; a full queue
//!   answers [`InferenceError::Overloaded`] at once.
//!
//! This crate knows nothing of bundles, HTTP or DICOM.

mod backend;
mod error;
pub mod explain;
mod stats;
mod tensor;
mod worker;

pub use backend::{
    Backend, BackendKind, DEFAULT_MAX_WORKING_BYTES, ExecutionProvider, LoadOptions, ModelMetadata,
    PROBE_MAX_BYTES, TensorSpec, TractKernels, Zeros, load, load_bytes, load_candle, zeros,
};
pub use error::InferenceError;
pub use stats::{BatchStat, Duration as StatDuration, ModelStats, StatsSnapshot};
pub use tensor::{
    DataType, Element, MAX_ELEMENTS, NamedTensor, Tensor, TensorError, UnknownDataType,
    element_count,
};
pub use worker::{
    BatchingConfig, DEFAULT_MAX_ROWS_PER_REQUEST, DEFAULT_QUEUE_BYTES, ModelWorker, WorkerConfig,
};

#[cfg(feature = "tract")]
pub use backend::tract::{
    DeclaredDim, DeclaredModel, DeclaredTensor, DeclaredType, declared_model, register_onnx_ml_ops,
    use_nightingale_kernels,
};

#[cfg(feature = "candle")]
pub use backend::candle::{ARCHITECTURES as CANDLE_ARCHITECTURES, CONV_CLASSIFIER};
